"""An encoded video -> the uint8 (T, H, W, C) frames a model takes, sampled from it by PyAV.

The video's packets are read first without decoding them (cheap): they give the frame count and
where the keyframes are. Then only what the sampled frames need is decoded: from the keyframe
before each one, seeking past the rest. Each frame is checked against the pixel limit before it is
converted (libav refuses a larger picture before it allocates it), the frames decoded per call are
bounded, and ``stop`` is asked between frames, so a decode whose request has ended stops at once.
Training and serving read videos here alike.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg

from media.errors import BadInput, InputError, Stopped, TooLarge, UnsupportedMedia
from media.spec import FrameFormat

Pick = Callable[[int], Sequence[int] | np.ndarray]  # frame count -> the indices to keep, in order
Stop = Callable[[], bool]  # true once the work is no longer wanted
MAX_DECODED = 10_000  # frames one call may decode


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # the `video` extra is not installed
        raise UnsupportedMedia("video input needs PyAV (pip install fusionserve[video])") from exc
    return av


@dataclass
class _Reader:
    """One open video stream and what may be spent decoding it."""

    container: Any
    stream: Any
    fmt: FrameFormat
    max_pixels: int
    max_decoded: int
    stop: Stop | None
    decoded: int = 0

    def frames(self) -> Any:
        """Decoded frames from the container's position, each checked and counted."""
        for packet in self.container.demux(self.stream):
            for frame in self._decoded(packet):
                if self.stop is not None and self.stop():
                    raise Stopped("the decode is no longer wanted")
                self.decoded += 1
                if self.decoded > self.max_decoded:
                    raise TooLarge(f"the video needs more than {self.max_decoded} frames decoded")
                self.check(frame.width, frame.height)
                yield frame

    def _decoded(self, packet: Any) -> list[Any]:
        """``packet``'s frames. A decoder that refuses a picture past the limit (libav's max_pixels) says
        so only as an error; the size it was given tells that from a corrupt packet."""
        try:
            return list(packet.decode())
        except _av().error.FFmpegError:
            self.check(self.stream.codec_context.width, self.stream.codec_context.height)
            if self.stream.codec_context.name == "mjpeg" and packet.size:
                height, width = simplejpeg.decode_jpeg_header(bytes(packet))[:2]
                self.check(width, height)
            raise

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise TooLarge(f"a video frame is {width}x{height}, more than {self.max_pixels} pixels")

    def resized(self, frame: Any) -> np.ndarray:
        fmt = self.fmt
        return frame.reformat(
            width=fmt.width, height=fmt.height, format="rgb24" if fmt.channels == 3 else "gray"
        ).to_ndarray()


def decode_video(
    source: bytes | Path,
    fmt: FrameFormat,
    pick: Pick,
    *,
    max_pixels: int = 1 << 31,
    max_decoded: int = MAX_DECODED,
    stop: Stop | None = None,
    threads: bool = False,
) -> np.ndarray:
    """The frames ``pick(frame count)`` chooses, uint8 (T, H, W, C) at ``fmt``'s size; ``threads``: the
    codec decodes on threads of its own (serving; training's loader workers run in parallel already).

    Raises ``BadInput`` for a file that does not decode, ``TooLarge`` past ``max_pixels`` in a frame or
    ``max_decoded`` frames decoded, ``UnsupportedMedia`` without PyAV, ``Stopped`` once ``stop()`` is true.
    """
    av = _av()
    try:
        with _open(av, source) as container:
            reader = _Reader(container, _stream(container, max_pixels), fmt, max_pixels, max_decoded, stop)
            if threads:
                reader.stream.thread_type = "AUTO"
            pts, keyframes = _index(container, reader.stream)
            if not pts:
                raise BadInput("the video has no frames")
            wanted = [int(i) for i in pick(len(pts))]
            got = _decode(av, source, reader, (pts, keyframes), sorted(set(wanted)))
    except (InputError, Stopped):
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise BadInput(f"the video could not be decoded ({exc})") from exc
    if not got:
        raise BadInput("no frame of the video could be decoded")
    last = got[max(got)]
    arr = np.stack([got.get(i, last) for i in wanted])  # a tail that does not decode repeats the last frame
    return arr[..., None] if arr.ndim == 3 else arr


def _open(av: Any, source: bytes | Path) -> Any:
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")


def _stream(container: Any, max_pixels: int) -> Any:
    """The first video stream, its header held to the pixel limit, and its decoder to the same limit."""
    if not container.streams.video:
        raise BadInput("the video has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > max_pixels:
        raise TooLarge(f"video frames are {w}x{h}, more than {max_pixels} pixels")
    # libav checks it before it allocates a picture (an int there)
    stream.codec_context.options = {"max_pixels": str(min(max_pixels, 2**31 - 1))}
    return stream


def _index(container: Any, stream: Any) -> tuple[list[Any], list[int]]:
    """(every frame's timestamp in presentation order, None where a packet has none; the keyframes'
    timestamps), from the packets alone."""
    pts: list[Any] = []
    keyframes: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's flush packet
        pts.append(packet.pts)
        if packet.is_keyframe and packet.pts is not None:
            keyframes.append(packet.pts)
    if all(t is not None for t in pts):
        pts.sort()
    return pts, sorted(keyframes)


def _decode(
    av: Any, source: bytes | Path, reader: _Reader, index: tuple[list[Any], list[int]], targets: list[int]
) -> dict[int, np.ndarray]:
    """The target frames, back from the start of the stream: seeking past what they do not need where
    every frame has a timestamp, else in one pass that keeps only the targets. A stream that cannot
    seek (a raw one) is opened again to read it from the start."""
    pts, keyframes = index
    try:
        reader.container.seek(keyframes[0] if keyframes else 0, stream=reader.stream, backward=True, any_frame=False)
    except av.error.PermissionError:
        with _open(av, source) as container:
            again = _Reader(container, _stream(container, reader.max_pixels), reader.fmt, reader.max_pixels,
                            reader.max_decoded, reader.stop)  # fmt: skip
            return _in_order(again, targets)
    if keyframes and all(t is not None for t in pts):
        return _seek_frames(reader, pts, keyframes, targets)
    return _in_order(reader, targets)


def _seek_frames(reader: _Reader, pts: list[int], keyframes: list[int], targets: list[int]) -> dict[int, np.ndarray]:
    """Decode each target frame (index into ``pts``) from the stream's start or its last position,
    seeking to the keyframe before a target only where a keyframe lies between the two."""
    got: dict[int, np.ndarray] = {}
    frames, position = reader.frames(), pts[0] - 1  # decoding from the start, nothing decoded yet
    for target in targets:
        want = pts[target]
        keyframe = keyframes[max(bisect.bisect_right(keyframes, want) - 1, 0)]
        if frames is None or position >= want or bisect.bisect_right(pts, position) < bisect.bisect_left(pts, keyframe):
            reader.container.seek(keyframe, stream=reader.stream, backward=True, any_frame=False)
            frames = reader.frames()
        for frame in frames:
            if frame.pts is None:
                continue
            position = frame.pts
            if position >= want:
                got[target] = reader.resized(frame)
                break
        else:
            frames = None  # the stream ended: the targets after this one repeat the last frame
    return got


def _in_order(reader: _Reader, targets: list[int]) -> dict[int, np.ndarray]:
    """Decode from the start, keeping the target frames (by their place in presentation order)."""
    got: dict[int, np.ndarray] = {}
    wanted, last = set(targets), max(targets)
    for i, frame in enumerate(reader.frames()):
        if i in wanted:
            got[i] = reader.resized(frame)
        if i >= last:
            break
    return got


def stream_length(container: Any) -> int:
    """Frames in the first video stream, from its header, else from the stream's or the container's duration."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if stream.frames:
        return int(stream.frames)
    if stream.duration and rate:
        return int(stream.duration * stream.time_base * rate)
    if container.duration and rate:  # WebM/MKV often only know the container's duration (microseconds)
        return round(container.duration / 1_000_000 * rate)
    return 0


def video_length(path: Path) -> int:
    """Frames in a video file's first video stream, from its header (0 when unknown)."""
    with _av().open(str(path)) as container:
        return stream_length(container)
