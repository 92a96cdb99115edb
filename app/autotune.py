"""Batch limits found by measuring, not guessing.

At warm-up the model's forward time is measured on the actual device for growing
batch sizes at the model's clip length. The chosen batch size is the one with the
most clips/s whose forward pass stays within the latency budget; a larger size must
beat the best so far by at least ``min_gain`` (10%) to be chosen, since it costs
latency. The frame limit follows as batch size x clip length. The sweep doubles the
batch until the budget or 64 clips; it does not stop at a flat stretch, because on CPUs
throughput can jump late (cache effects: the seed model gains 1.4x only at 16 clips).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choice:
    max_batch_size: int
    max_batch_frames: int
    clip_frames: int
    budget_ms: float
    measured: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> {ms, clips_per_s}

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_batch_frames": self.max_batch_frames,
            "clip_frames": self.clip_frames,
            "latency_budget_ms": self.budget_ms,
            "measured": {str(b): m for b, m in self.measured.items()},
        }


def time_forward(forward: Forward, batch: int, frames: int, shape: tuple[int, int, int], repeats: int) -> float:
    """Fastest of ``repeats`` runs (s) of ``forward`` on ``batch`` clips of ``frames`` uint8 frames (C, H, W)."""
    clips = torch.randint(0, 256, (batch * frames, *shape), dtype=torch.uint8)
    lengths = torch.full((batch,), frames)
    forward(clips, lengths)  # warm this shape
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward(clips, lengths)
        times.append(time.perf_counter() - started)
    return min(times)  # the least disturbed run: on a shared machine noise only adds time


def choose_batch_limits(
    forward: Forward,
    *,
    frames: int,
    shape: tuple[int, int, int],
    budget_ms: float,
    max_size: int = 64,
    min_gain: float = 0.1,
    repeats: int = 5,
) -> Choice:
    measured: dict[int, dict[str, float]] = {}
    best, best_rate = 1, 0.0
    size = 1
    while size <= max_size:
        seconds = time_forward(forward, size, frames, shape, repeats)
        rate = size / seconds
        measured[size] = {"ms": round(seconds * 1000, 3), "clips_per_s": round(rate, 1)}
        if seconds * 1000 > budget_ms and size > 1:
            break  # larger batches only take longer
        if rate > best_rate * (1 + min_gain):
            best, best_rate = size, rate
        size *= 2
    choice = Choice(best, best * frames, frames, budget_ms, measured)
    log.info(
        "batch limits by measurement: %d clips, %d frames (%s)",
        best,
        best * frames,
        ", ".join(f"{b}: {m['clips_per_s']} clips/s" for b, m in measured.items()),
    )
    return choice
