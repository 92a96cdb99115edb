"""A batcher and an intake around a fake model, for the batching and intake tests.

``Harness.submit`` goes the way a KServe request goes (clips already decoded, through
``Intake.classify_clips``); ``Harness.classify`` the way a /predict upload goes, with
``ManualDecoders`` standing in for the decode threads: the test decides when, on which
thread, and with what each upload's decoding ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from app.batching import Batcher, BatchPolicy, BatchStats, Result
from app.intake import Answer, Intake
from app.runtime import Done
from app.uploads import Target, Upload
from media import FrameFormat, Limits


class FakeModel:
    """Sums each clip's pixels; records batches; can be slowed down or poisoned (a clip of 255s raises)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0  # forward calls started (the worker may be waiting at the gate)

    def __call__(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.entered += 1
        self.gate.wait()
        self.batches.append(lengths.tolist())
        clips = frames.split(lengths.tolist())
        if any(bool((c == 255).all()) for c in clips):
            raise RuntimeError("poisoned clip")
        time.sleep(self.delay_s)
        return torch.stack([torch.tensor([float(c.sum()), float(len(c))]) for c in clips])

    def run(self, frames: torch.Tensor, lengths: torch.Tensor) -> Done:
        """As the CPU runtime runs a batch: computed by the time it returns."""
        return Done(self(frames, lengths))


class ManualDecoders:
    """Decoders whose jobs wait for the test: ``finish(i, array_or_exc)`` ends job ``i`` as a decode
    thread would, ``skip(i)`` asks whether job ``i`` would be skipped now."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., None], Callable[[], bool]]] = []
        self.cancelled: list[int] = []

    def decode(self, upload: Upload, target: Target, done: Callable[..., None], skip: Callable[[], bool]) -> Any:
        self.jobs.append((done, skip))
        index = len(self.jobs) - 1
        return lambda: self.cancelled.append(index)

    def finish(self, index: int, outcome: np.ndarray | BaseException) -> None:
        done, _ = self.jobs[index]
        if isinstance(outcome, BaseException):
            done(None, outcome)
        else:
            done(outcome, None)

    def skip(self, index: int) -> bool:
        return self.jobs[index][1]()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def clip(frames: int, value: int = 1) -> torch.Tensor:
    """(T, C, H, W) uint8 of ``value``: a clip the fake model sums to ``4 * value * frames``."""
    return torch.full((frames, 1, 2, 2), value, dtype=torch.uint8)


def pixels(frames: int, value: int = 1) -> np.ndarray:
    """The same clip as a decoder gives it: (T, H, W, C) uint8."""
    return np.full((frames, 2, 2, 1), value, dtype=np.uint8)


async def never() -> None:
    """A client that never leaves."""
    await asyncio.Event().wait()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition a worker thread brings about, instead of guessing a sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


class Harness:
    """A started batcher for ``run`` under a policy of small defaults, and an intake in front of it."""

    def __init__(
        self,
        run: Callable[[torch.Tensor, torch.Tensor], Any],
        *,
        decode_timeout_s: float = 60.0,
        after_batch: Callable[[], object] | None = None,
        **policy: Any,
    ) -> None:
        opts = {"max_batch_size": 8, "max_batch_frames": 100, "max_queue": 64, "timeout_s": 10.0, **policy}
        self.stats: list[BatchStats] = []
        self.drops: list[str] = []
        self.batcher = Batcher(
            "m",
            run,
            BatchPolicy(**opts),
            on_batch=self.stats.append,
            on_drop=self.drops.append,
            after_batch=after_batch,
        )
        target = Target(FrameFormat(2, 2, 1), 4, Limits(16, 100))
        self.served = SimpleNamespace(name="m", batcher=self.batcher, target=target)
        self.decoders = ManualDecoders()
        self.intake = Intake(self.decoders, {"m": self.served}, decode_timeout_s)  # type: ignore[arg-type,dict-item]
        self.batcher.start()

    @property
    def depth(self) -> int:
        return self.batcher.depth

    async def submit(self, one: torch.Tensor) -> Result:
        [result] = await self.submit_many([one])
        return result

    async def submit_many(self, clips: list[torch.Tensor]) -> list[Result]:
        return await self.intake.classify_clips(self.served, clips, never)  # type: ignore[arg-type]

    async def classify(self, gone: Callable[[], Any] = never) -> Answer:
        """An upload, decoded when the test says so (``self.decoders.finish``)."""
        return await self.intake.classify(self.served, Upload("form", b""), gone)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.batcher.close()
