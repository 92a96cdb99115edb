"""The stream stepper on its own, with the bundled model: a stream discarded while its frame is in a
batch leaves the others' answers intact, and the thread outlives a closed event loop and a failing
hook (tests/e2e/test_streams.py goes through a real server)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.runtime import ModelRuntime
from app.streams import Step, Stepped, Stepper, Stream
from models import load_checkpoint
from tests.support.media import synth_clip


def runtime_of(path: Path) -> ModelRuntime:
    return ModelRuntime(load_checkpoint(path), torch.device("cpu"))


async def step_all(stepper: Stepper, streams: list[Stream], frames: np.ndarray) -> list[Stepped | None]:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in streams]
    for stream, future, frame in zip(streams, futures, frames, strict=True):
        stepper.submit(stream, Step(frame, False, True, future))
    await asyncio.wait(futures)
    return [None if f.cancelled() or f.exception() else f.result() for f in futures]


def test_a_stream_discarded_mid_batch_leaves_the_others_answers(default_ckpt: Path) -> None:
    runtime = runtime_of(default_ckpt)
    frames = synth_clip("left", 4, seed=1)
    stepper = Stepper(runtime, max_batch=8)
    streams = [stepper.open() for _ in range(4)]
    original = runtime.compute

    def discarding(fn: Any, batch: Any, **kw: Any) -> Any:  # the client of stream 1 leaves while it is stepped
        stepper.discard(streams[1])
        return original(fn, batch, **kw)

    runtime.compute = discarding  # type: ignore[method-assign]
    stepper.start()
    try:
        got = asyncio.run(step_all(stepper, streams, frames))
    finally:
        stepper.close()
    alone = Stepper(runtime_of(default_ckpt), max_batch=1)
    alone.start()
    try:
        for i in (0, 2, 3):
            [want] = asyncio.run(step_all(alone, [alone.open()], frames[i : i + 1]))
            assert got[i] is not None and want is not None
            np.testing.assert_allclose(got[i].probs, want.probs, atol=1e-5)  # type: ignore[union-attr]
    finally:
        alone.close()
    assert streams[1].state is None  # dropped by the stepper's thread after the batch


def test_the_thread_outlives_a_closed_loop_and_a_failing_hook(default_ckpt: Path) -> None:
    def failing() -> None:
        raise RuntimeError("housekeeping failed")

    stepper = Stepper(runtime_of(default_ckpt), max_batch=4, after_batch=failing)
    stepper.start()
    frames = synth_clip("up", 2, seed=2)
    try:

        async def abandoned() -> None:  # its loop closes before its answer is settled
            stepper.submit(stepper.open(), Step(frames[0], False, True, asyncio.get_running_loop().create_future()))

        asyncio.run(abandoned())
        [second] = asyncio.run(step_all(stepper, [stepper.open()], frames[1:]))
        assert second is not None and second.probs is not None
    finally:
        stepper.close()
