"""Batch limits found by measuring the model at start, not by guessing.

The forward pass is timed on the actual device for batch sizes 1, 2, 4, ... at the model's
clip length, up to 64 clips or the first size over the latency budget. The sizes are timed
in turns, each sample running the same number of clips and each size keeping its fastest
sample, so that a slow stretch of a shared machine hits every size alike, and the turns go
on until one leaves the choice as it was: the choice holds from start to start. The limit is the
largest size within the budget whose clips/s is within ``tolerance`` of the best size's: a
large limit costs nothing while the server is quiet (a lone clip runs at once), and under
load it spreads the server's per-batch costs over more clips. The frame limit follows as
batch size x clip length.

The same measurement sets when a second instance (``INSTANCES``, CPU) joins a busy one
(``share_from``): once a quarter of a batch waits when batching gains more than the
tolerance over single clips, so that such a model keeps batching under load; at once when
it does not, because two single-clip passes side by side then beat one pass on both threads.
docs/performance.md gives the measurements behind both rules. The stream steppers' batch cap is
chosen the same way, with a step batch (one frame per stream) as the forward pass.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MAX_SIZE = 64  # the largest batch the sweep tries


@dataclass(frozen=True)
class Choice:
    max_batch_size: int
    max_batch_frames: int
    clip_frames: int
    budget_ms: float
    measured: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> {ms, clips_per_s}
    batching_gain: float = 1.0  # the median clips/s of the batch sizes within the budget over single clips'
    share_from: int = 1  # clips waiting before a second instance starts beside a busy one

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_batch_frames": self.max_batch_frames,
            "clip_frames": self.clip_frames,
            "latency_budget_ms": self.budget_ms,
            "batching_gain": self.batching_gain,
            "share_from": self.share_from,
            "measured": {str(b): m for b, m in self.measured.items()},
        }


def make_batch(batch: int, frames: int, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random clips of ``frames`` uint8 frames of ``shape`` (C, H, W), concatenated, with their lengths.

    The frames have channels-last strides, as decoded frames reach the model (a (T, H, W, C)
    array seen as (T, C, H, W)): the convolutions run at another, uneven speed from contiguous
    frames, so timing those would pick limits for inputs the server never sees.
    """
    channels, height, width = shape
    clips = torch.randint(0, 256, (batch * frames, height, width, channels), dtype=torch.uint8)
    return clips.permute(0, 3, 1, 2), torch.full((batch,), frames)


def time_once(forward: Forward, batch: tuple[torch.Tensor, torch.Tensor], calls: int = 1) -> float:
    """Seconds per call of ``calls`` back-to-back calls."""
    started = time.perf_counter()
    for _ in range(calls):
        forward(*batch)
    return (time.perf_counter() - started) / calls


def choose_batch_limits(
    forward: Forward,
    *,
    frames: int,
    shape: tuple[int, int, int],
    budget_ms: float,
    max_size: int = MAX_SIZE,
    tolerance: float = 0.2,
    repeats: int = 6,
    settle: int = 2,
) -> Choice:
    """Sweep batch sizes 1, 2, 4, ... up to ``max_size`` or the first over the budget, then time the
    sizes within the budget in turns, each sample running as many clips as the largest of them
    holds, so that a slow stretch of a shared machine hits every size alike; each size keeps its
    fastest sample. From turn ``settle`` on, the turns stop once a turn leaves the choice as the
    turn before it did, and after ``repeats`` turns in any case.
    """
    inputs, over = sweep(forward, frames, shape, budget_ms, max_size)
    fastest = dict.fromkeys(inputs, float("inf"))
    decided: tuple[int, float, int] | None = None
    for turn in range(1, repeats + 1):
        time_turn(forward, inputs, fastest)
        if turn >= settle or turn == repeats:
            decision = decide(fastest, budget_ms, tolerance)
            if decided is not None and decision[::2] == decided[::2]:  # the same size and share_from
                decided = decision
                break
            decided = decision
    assert decided is not None, "repeats must be at least 1"
    best, gain, share_from = decided
    measured = {size: {"ms": round(t * 1000, 3), "clips_per_s": round(size / t, 1)} for size, t in fastest.items()}
    if over is not None:  # the size that ended the sweep, from its fastest call
        size, t = over
        measured[size] = {"ms": round(t * 1000, 3), "clips_per_s": round(size / t, 1), "over_budget": True}
    choice = Choice(best, best * frames, frames, budget_ms, measured, round(gain, 3), share_from)
    log.info(
        "batch limits by measurement: %d clips, %d frames, a second instance from %d waiting "
        "(gain %.2fx, %d turns; %s)",
        best,
        best * frames,
        share_from,
        gain,
        turn,
        ", ".join(f"{b}: {m['clips_per_s']} clips/s" for b, m in measured.items()),
    )
    return choice


def decide(fastest: dict[int, float], budget_ms: float, tolerance: float) -> tuple[int, float, int]:
    """(clip limit, batching gain, share_from) from each size's fastest seconds per call."""
    within = [size for size, t in fastest.items() if size == 1 or t * 1000 <= budget_ms]
    top_rate = max(size / fastest[size] for size in within)
    best = max(size for size in within if size / fastest[size] >= (1 - tolerance) * top_rate)
    # the typical batch's clips/s over single clips', not the luckiest size's: the largest of several
    # noisy rates reads high, and put this gain on either side of the tolerance from start to start
    batched = [size / fastest[size] for size in within if size > 1]
    gain = statistics.median(batched) * fastest[1] if batched else 1.0
    return best, gain, max(1, best // 4) if gain > 1 + tolerance else 1


def sweep(
    forward: Forward, frames: int, shape: tuple[int, int, int], budget_ms: float, max_size: int
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], tuple[int, float] | None]:
    """The batches of the sizes to time (1, 2, 4, ... within the budget), and the size that ended the
    sweep over it with its fastest call, if one did. A size is over the budget only when each of its
    three calls is: on a shared machine a slow moment can stretch one or two calls past it."""
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    size = 1
    while size <= max_size:
        batch = make_batch(size, frames, shape)
        forward(*batch)  # warm this shape
        quick = float("inf")
        for _ in range(3):
            quick = min(quick, time_once(forward, batch))
            if quick * 1000 <= budget_ms:
                break
        if quick * 1000 > budget_ms and size > 1:
            return inputs, (size, quick)  # larger batches only take longer
        inputs[size] = batch
        size *= 2
    return inputs, None


def time_turn(
    forward: Forward, inputs: dict[int, tuple[torch.Tensor, torch.Tensor]], fastest: dict[int, float]
) -> None:
    """One equal-work sample of every size, each keeping its fastest seconds per call in ``fastest``."""
    clips = max(inputs)  # per sample, whatever the size: sizes are powers of two
    for size, batch in inputs.items():
        fastest[size] = min(fastest[size], time_once(forward, batch, clips // size))
