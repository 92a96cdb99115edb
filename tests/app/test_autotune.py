"""Batch limits chosen by measurement; explicit settings win."""

from __future__ import annotations

import time

import numpy as np
import torch

from app.autotune import choose_batch_limits
from app.uploads import Target
from bench.media import encode_jpeg
from media import FrameFormat, Limits
from tests.support.clips import images_clip


def fake_forward(per_call_ms: float, per_clip_ms: float):  # type: ignore[no-untyped-def]
    """A forward pass costing a fixed overhead plus a cost per clip (sleeps; no real compute)."""

    def forward(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        time.sleep((per_call_ms + per_clip_ms * len(lengths)) / 1000)
        return torch.zeros(len(lengths), 2)

    return forward


def test_a_large_fixed_overhead_favours_big_batches() -> None:
    choice = choose_batch_limits(
        fake_forward(20, 0.5), frames=4, shape=(1, 2, 2), budget_ms=1000, max_size=64, repeats=1
    )
    assert choice.max_batch_size == 64 and choice.max_batch_frames == 256
    assert choice.measured[64]["clips_per_s"] > 5 * choice.measured[1]["clips_per_s"]
    # batching pays: a second instance starts only once a quarter of a batch waits
    assert choice.batching_gain > 5 and choice.share_from == 16


def test_flat_throughput_takes_the_largest_batch_within_the_budget() -> None:
    # 10 ms per clip whatever the batch: batching is throughput-neutral for the model, and a
    # large limit only fills under load, where it spreads the server's per-batch costs
    choice = choose_batch_limits(fake_forward(0, 10), frames=8, shape=(1, 2, 2), budget_ms=200, repeats=2)
    assert choice.max_batch_size == 16  # 16 clips take 160 ms; 32 take 320, over the budget
    assert max(choice.measured) == 32
    # no gain from batching: a second instance starts beside a busy one as soon as a clip waits
    assert choice.batching_gain < 1.2 and choice.share_from == 1


def slower_past(knee: int, per_clip_ms: float):  # type: ignore[no-untyped-def]
    """A forward pass whose cost per clip doubles from ``knee`` clips to twice that (a cache falling over)."""

    def forward(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = len(lengths)
        time.sleep(n * per_clip_ms * (1 + max(0, n - knee) / knee) / 1000)
        return torch.zeros(n, 2)

    return forward


def test_a_batch_size_that_loses_throughput_is_not_chosen() -> None:
    # two samples each (the fastest kept), so one sleep that overran on a busy machine cannot decide
    choice = choose_batch_limits(slower_past(4, 2), frames=8, shape=(1, 2, 2), budget_ms=300, repeats=2)
    assert choice.max_batch_size == 4  # 8 clips run at half the rate of 4, 16 clips at a quarter
    assert max(choice.measured) == 32  # 32 clips take 512 ms: over the budget, the sweep stopped


def test_the_latency_budget_caps_the_batch() -> None:
    choice = choose_batch_limits(fake_forward(20, 2), frames=8, shape=(1, 2, 2), budget_ms=60, repeats=2)
    # 16 clips take 52 ms (within 60), 32 clips take 84 ms: over the budget.
    assert choice.max_batch_size == 16 and 32 in choice.measured


def test_every_sample_runs_as_many_clips_whatever_the_batch_size() -> None:
    # a shared machine's speed swings within a second: samples of equal work (not one call each,
    # 1 clip against 32) give every size the same chance of a fast or a slow moment
    clips: dict[int, int] = {}

    def forward(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        clips[len(lengths)] = clips.get(len(lengths), 0) + len(lengths)
        return torch.zeros(len(lengths), 2)

    choose_batch_limits(forward, frames=2, shape=(1, 2, 2), budget_ms=1000, max_size=16, repeats=2)
    assert sorted(clips) == [1, 2, 4, 8, 16]
    # each size: one warm-up call and one timed call (within the budget) in the sweep, then 2 samples of 16 clips
    assert all(n == 2 * size + 2 * 16 for size, n in clips.items()), clips


def test_a_size_is_over_the_budget_only_when_three_calls_are_and_is_then_not_timed_again() -> None:
    calls: dict[int, int] = {}
    slow_once = {4: 1}  # the first timed call of 4 clips meets a slow moment of the machine

    def forward(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        n = len(lengths)
        calls[n] = calls.get(n, 0) + 1
        if calls[n] == 2 and slow_once.get(n):  # call 1 warms up; call 2 is the first timed one
            time.sleep(0.12)
        time.sleep(n * 0.004)  # 4 ms a clip: 8 clips take 32 ms, 16 clips 64 ms
        return torch.zeros(n, 2)

    choice = choose_batch_limits(forward, frames=2, shape=(1, 2, 2), budget_ms=50, repeats=2)
    assert choice.max_batch_size == 8  # 4 stayed in though one call ran over; 16 is over in all three
    assert choice.measured[16].get("over_budget") is True and calls[16] == 4  # a warm-up and three calls
    assert "over_budget" not in choice.measured[8]


def test_the_sweep_times_frames_laid_out_as_decoded_frames_arrive() -> None:
    # decoded frames reach the model as (T, H, W, C) arrays seen as (T, C, H, W); timing
    # contiguous frames instead measured a different (slower, unevenly so) convolution path
    seen: list[torch.Tensor] = []

    def forward(frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seen.append(frames)
        return torch.zeros(len(lengths), 2)

    choose_batch_limits(forward, frames=4, shape=(3, 8, 6), budget_ms=100, max_size=2, repeats=1)
    clip = images_clip(
        [encode_jpeg(np.zeros((8, 6, 3), np.uint8))] * 4, Target(FrameFormat(8, 6, 3), 4, Limits(8, 10**6))
    )
    assert seen and all(f.shape[1:] == clip.shape[1:] and f.dtype == clip.dtype for f in seen)
    assert all(f.stride()[1:] == clip.stride()[1:] for f in seen)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in seen)


def test_the_turns_stop_once_the_choice_holds_and_go_on_while_it_moves() -> None:
    calls: dict[int, int] = {1: 0, 2: 0, 4: 0}

    def forward(frames: torch.Tensor, lengths: torch.Tensor, slow_calls: tuple[int, ...]) -> torch.Tensor:
        n = len(lengths)
        calls[n] += 1
        time.sleep(0.002 * n * (4 if n == 4 and calls[n] in slow_calls else 1))  # 2 ms a clip, or 8
        return torch.zeros(n, 2)

    # steady: the choice after the 2nd turn holds in the 3rd, and the turns stop there
    choice = choose_batch_limits(lambda f, n: forward(f, n, ()), frames=2, shape=(1, 2, 2), budget_ms=1000, max_size=4)
    assert choice.max_batch_size == 4 and calls[1] == 2 + 3 * 4  # the sweep's 2 calls, 3 turns of 4 single clips
    # 4 clips slow in the first two turns (its calls 3 and 4 after the sweep's two): 2 clips chosen after the
    # 2nd turn, 4 after the 3rd, which the 4th confirms
    calls.update({1: 0, 2: 0, 4: 0})
    choice = choose_batch_limits(
        lambda f, n: forward(f, n, (3, 4)), frames=2, shape=(1, 2, 2), budget_ms=1000, max_size=4
    )
    assert choice.max_batch_size == 4 and calls[1] == 2 + 4 * 4
