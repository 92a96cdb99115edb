"""One model's worker threads: batches taken from its queue, run, and answered.

While the model is idle a lone clip runs at once; while it is busy new clips gather for the
next batch (``app.batching.queue``). A batch that fails is run again clip by clip, so only
the clip that causes the failure fails. Where a batch is only queued when ``run`` returns
(CUDA), the worker takes and starts the next batch before it waits for this one, so copies
and Python overlap the device's work; there a batch's inference time runs from its start to
its answer and may include the end of the batch before it. ``close`` answers every accepted
clip, then stops the workers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from app.batching.policy import BatchPolicy
from app.batching.queue import ClipQueue
from app.batching.tickets import BatchStats, Result, Ticket, settle
from app.errors import InferenceFailed
from host.threads import name_os_thread

log = logging.getLogger(__name__)


class Pending(Protocol):
    """A batch started on the model: ``ready`` once its probabilities are computed (always on the
    CPU), ``result()`` waits for them: (B, K) float32 on the CPU."""

    @property
    def ready(self) -> bool: ...

    def result(self) -> torch.Tensor: ...


Run = Callable[[torch.Tensor, torch.Tensor], Pending]  # (frames (N, C, H, W) uint8, lengths (B,)) -> Pending
Stage = Callable[[list[torch.Tensor]], torch.Tensor]  # clips (T, C, H, W) -> frames (N, C, H, W)


@dataclass
class _InFlight:
    batch: list[Ticket]
    lengths: torch.Tensor
    started: float
    pending: Pending


class Batcher:
    """``policy.instances`` worker threads that take batches from one ``ClipQueue`` and ``run`` them.

    ``on_batch`` gets each answered batch's statistics, ``after_batch`` runs in the worker after
    each batch (housekeeping such as ``app.memory.HeapRelease``). ``stage`` puts a batch's clips
    together for ``run`` (``ModelRuntime.stage``: on CUDA straight into pinned memory, or on the
    device for clips decoded there); by default ``torch.cat``.
    """

    def __init__(
        self,
        name: str,
        run: Run,
        policy: BatchPolicy,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        after_batch: Callable[[], object] | None = None,
        stage: Stage | None = None,
    ) -> None:
        self.name, self.policy, self._run = name, policy, run
        self._stage: Stage = stage or torch.cat
        self.queue = ClipQueue(name, policy, on_drop)
        self._on_batch = on_batch or (lambda stats: None)
        self._after_batch = after_batch
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{name}-{i}", daemon=True)
            for i in range(policy.instances)
        ]

    @property
    def depth(self) -> int:
        return self.queue.depth

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    async def close(self) -> None:
        self.queue.close()
        for thread in self._threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)

    def _work(self) -> None:
        name_os_thread()
        inflight: _InFlight | None = None
        while True:
            batch = self.queue.take(len(self._threads), block=inflight is None)
            if batch is None:
                return
            started = self._guarded(self._start, batch) if batch else None
            if batch and started is None:
                self.queue.batch_done()  # answered already (the CPU), or failed
            if inflight is not None:
                self._guarded(self._finish, inflight)
                self.queue.batch_done()
            if batch or inflight is not None:
                self._housekeeping()
            inflight = started

    def _housekeeping(self) -> None:
        if self._after_batch is None:
            return
        try:
            self._after_batch()
        except Exception:  # housekeeping must never stop the worker
            log.exception("batcher %s: after-batch hook failed", self.name)

    def _guarded(self, step: Callable[..., _InFlight | None], arg: list[Ticket] | _InFlight) -> _InFlight | None:
        try:
            return step(arg)
        except Exception as exc:  # never let the worker die with clips in hand
            log.exception("batcher %s: unexpected error", self.name)
            for ticket in arg.batch if isinstance(arg, _InFlight) else arg:
                settle(ticket, exc=InferenceFailed(f"internal error: {exc}"))
            return None

    def _start(self, batch: list[Ticket]) -> _InFlight | None:
        """Start ``batch``; answered now when its result is ready, else returned to finish later."""
        started = time.perf_counter()
        frames = self._stage([t.clip for t in batch])  # (N, C, H, W)
        lengths = torch.tensor([t.clip.shape[0] for t in batch])  # (B,)
        try:
            pending = self._run(frames, lengths)
            if not pending.ready:
                return _InFlight(batch, lengths, started, pending)
            probs = self._result(pending, len(batch))
        except Exception as exc:
            self._failed(batch, exc)
            return None
        self._answer(batch, lengths, started, probs)
        return None

    def _finish(self, inflight: _InFlight) -> None:
        try:
            probs = self._result(inflight.pending, len(inflight.batch))
        except Exception as exc:
            self._failed(inflight.batch, exc)
            return
        self._answer(inflight.batch, inflight.lengths, inflight.started, probs)

    @staticmethod
    def _result(pending: Pending, clips: int) -> torch.Tensor:
        probs = pending.result()  # (B, K)
        if probs.shape[0] != clips:
            raise RuntimeError(f"the model returned {probs.shape[0]} rows for {clips} clips")
        return probs

    def _failed(self, batch: list[Ticket], exc: Exception) -> None:
        """A batch that raised: its one clip fails, or each clip is run again on its own."""
        if len(batch) == 1:
            log.warning("model %s failed on a clip of %d frames: %s", self.name, batch[0].clip.shape[0], exc)
            settle(batch[0], exc=InferenceFailed(str(exc)))
            return
        log.warning("batch of %d on %s failed (%s); retrying clip by clip", len(batch), self.name, exc)
        for ticket in batch:
            started = time.perf_counter()
            try:
                probs = self._result(self._run(ticket.clip, torch.tensor([ticket.clip.shape[0]])), 1)
            except Exception as one:
                self._failed([ticket], one)
                continue
            self._answer([ticket], torch.tensor([ticket.clip.shape[0]]), started, probs)

    def _answer(self, batch: list[Ticket], lengths: torch.Tensor, started: float, probs: torch.Tensor) -> None:
        spent = time.perf_counter() - started
        try:  # statistics first, so metrics read after an answer already count its batch
            self._on_batch(BatchStats(len(batch), int(lengths.sum()), [started - t.enqueued for t in batch], spent))
        except Exception:
            log.exception("batcher %s: batch statistics callback failed", self.name)
        for ticket, row in zip(batch, probs, strict=True):
            settle(ticket, Result(row, started - ticket.enqueued, spent, len(batch), int(ticket.clip.shape[0])))
