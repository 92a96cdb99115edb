"""What decoded frames look like (``FrameFormat``) and what a decoder refuses to decode (``Limits``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class HasFrameShape(Protocol):
    @property
    def height(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def channels(self) -> int: ...


@dataclass(frozen=True)
class FrameFormat:
    """Frames as a model takes them: ``height`` x ``width`` pixels of ``channels`` (3: RGB, 1: grey)."""

    height: int
    width: int
    channels: int

    @classmethod
    def of(cls, spec: HasFrameShape) -> FrameFormat:
        """The format of a model's input spec (``models.InputSpec``), or of anything with those three sizes."""
        return cls(spec.height, spec.width, spec.channels)

    @property
    def mode(self) -> str:
        """Pillow's image mode for these frames."""
        return "RGB" if self.channels == 3 else "L"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow orders them."""
        return self.width, self.height


@dataclass(frozen=True)
class Limits:
    """What one input may hold before it is refused: frames in one clip, pixels in one frame, and
    frames decoded from one video."""

    max_frames: int = 10_000
    max_pixels: int = 1 << 31
    max_decoded: int = 10_000
