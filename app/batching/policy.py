"""How one model's clips are batched: limits, delay, instances, and when a second instance starts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """The batching of one model.

    A batch holds at most ``max_batch_size`` clips and ``max_batch_frames`` frames (a lone clip
    over the frame limit still runs). ``max_queue`` clips may wait (and as many uploads wait to be
    decoded); a clip queued longer than ``timeout_s`` is dropped with a timeout. ``max_delay_s``
    holds a batch open for more clips; 0: none. ``instances`` worker threads take batches from
    the one queue; while one is busy another starts only once ``share_from`` clips (or a full
    batch of frames) wait, so that a model that gains from batching keeps batching under load.
    """

    max_batch_size: int
    max_batch_frames: int
    max_queue: int
    timeout_s: float
    max_delay_s: float = 0.0
    instances: int = 1
    share_from: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_frames", "max_queue", "instances", "share_from"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must not be negative, got {self.max_delay_s}")
