"""Dynamic batching: one bounded queue and one worker thread per model.

The event loop only enqueues and awaits. The worker takes queued clips in arrival
order into a batch bounded by clips and by frames; when the model is idle a lone clip
runs at once, and while it is busy new clips gather for the next batch (an extra wait
only when ``max_delay_s`` asks for one). A clip whose caller timed out or went away
is dropped before it costs compute. A batch that raises is retried clip by clip, so
only the clip that causes the failure fails. ``close`` stops taking work, answers
every accepted clip, then stops the worker.

With ``launch`` (the CUDA path) the worker keeps two batches in flight: it starts the
next batch (its host-to-device copy and queued kernels) before it waits for the
current one, so copies and Python overhead overlap the GPU's work. Without it (the
CPU, where a forward pass is done when it returns) batches run one after another. With
two batches in flight a batch's inference time runs from its launch to its answer, so
it includes the end of the batch before it.

``workers`` worker threads (default 1) each take their own batches from the one queue
(Triton's "instance count"; on the CPU they share torch's threads, see
``app.runtime.CpuThreads``). A worker starts a batch when no other is busy, or, while
another is, only once ``share_from`` clips (or a full batch of frames) are waiting: a
model whose clips/s grows with the batch keeps gathering batches under load instead of
two workers splitting the queue into single clips. With ``share_from`` 1 (a model that
does not gain from batching) a worker takes only its share of what waits, split among
itself and the idle workers, so that one worker does not take the whole queue while
another has nothing to do.

``after_batch`` runs in the worker once a batch's clips are answered (housekeeping, such
as handing free heap memory back: ``models.system.HeapRelease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


class TimedOut(Exception):
    """The clip waited in the queue past its deadline, or was not decoded in time."""


class InferenceFailed(Exception):
    """The model raised on this clip (alone)."""


@dataclass(frozen=True)
class Result:
    probabilities: torch.Tensor  # (K,) float32
    queue_s: float
    inference_s: float
    batch_size: int
    frames: int  # the clip's frames (the ticket lets go of them once answered)


@dataclass(frozen=True)
class BatchStats:
    size: int
    frames: int
    queue_s: list[float]
    inference_s: float


_NO_CLIP = torch.empty(0, dtype=torch.uint8)


@dataclass(eq=False)
class Ticket:
    """One clip's place: taken on the event loop (``Batcher.tickets``), queued with its clip from any
    thread (``Batcher.enqueue``); its future is answered on ``loop``."""

    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    clip: torch.Tensor = field(default=_NO_CLIP)  # (T, C, H, W) uint8, once queued
    enqueued: float = field(default=0.0)  # time.perf_counter() when queued
    deadline: float = field(default=math.inf)  # for waiting in the queue; none before it is queued
    cancelled: bool = field(default=False)  # written under the batcher's lock
    started: bool = field(default=False)  # written under the batcher's lock
    # called (on the loop) once every clip of its request is withdrawn, e.g. to cancel a pending decode
    on_abandon: Callable[[], object] | None = field(default=None)


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Launched(Protocol):
    def wait(self) -> torch.Tensor: ...


Launch = Callable[[torch.Tensor, torch.Tensor], Launched]


@dataclass
class _InFlight:
    batch: list[Ticket]
    lengths: torch.Tensor
    started: float
    handle: Launched


def _retrieve(future: asyncio.Future[Result]) -> None:
    if not future.cancelled():
        future.exception()


class _Expiry:
    """A request's deadline timer on the event loop: ``Batcher._expire`` when it fires, re-armed
    until none of the request's clips waits.

    No reference cycle outlives the request: ``cancel`` cancels the loop's handle, and asyncio
    clears a cancelled handle's callback (the one reference back to this object). A closure that
    re-armed itself was a cycle (the function in its own cell) holding the request's decoded clips
    until Python's cyclic collector ran: hundreds of clips, tens of MB, under sustained load
    (docs/PERFORMANCE.md).
    """

    __slots__ = ("batcher", "since", "tickets", "timer")

    def __init__(self, batcher: Batcher, tickets: list[Ticket]) -> None:
        self.batcher, self.tickets = batcher, tickets
        self.since = time.perf_counter()  # the body is read and its decoding started
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = loop.call_later(
            min(batcher.timeout_s, batcher.decode_timeout_s), self.check
        )

    def check(self) -> None:
        self.timer = None
        again = self.batcher._expire(self.tickets, self.since)
        if again is not None:
            self.timer = asyncio.get_running_loop().call_later(again, self.check)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Batcher:
    def __init__(
        self,
        name: str,
        forward: Forward,
        *,
        max_batch_size: int,
        max_batch_frames: int,
        max_delay_s: float,
        max_queue: int,
        timeout_s: float,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        launch: Launch | None = None,
        workers: int = 1,
        share_from: int = 1,
        after_batch: Callable[[], object] | None = None,
        decode_timeout_s: float = math.inf,
    ) -> None:
        if min(max_batch_size, max_batch_frames, max_queue, workers, share_from) < 1:
            raise ValueError("batch limits, queue size, workers and share_from must be positive")
        if timeout_s <= 0 or decode_timeout_s <= 0 or max_delay_s < 0:
            raise ValueError("the timeouts must be positive and the delay not negative")
        self.name = name
        self._forward = forward
        self._launch = launch
        self.max_batch_size, self.max_batch_frames = max_batch_size, max_batch_frames
        self.max_delay_s, self.max_queue, self.timeout_s = max_delay_s, max_queue, timeout_s
        self.decode_timeout_s = decode_timeout_s  # from ``wait`` (body read, decoding started) to queued
        self._on_batch = on_batch or (lambda stats: None)
        self._on_drop = on_drop or (lambda reason: None)
        self._after_batch = after_batch  # in the worker, once a batch's clips are answered
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.share_from = share_from
        self._busy = 0  # workers holding a batch (taken and not yet answered)
        self._undecoded = 0  # clips read and still to be decoded (``reserve``), at most max_queue beside the queue
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{name}-{i}", daemon=True) for i in range(workers)
        ]

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    async def submit(self, clip: torch.Tensor) -> Result:
        """Queue one clip (T, C, H, W) and wait for its probabilities."""
        [result] = await self.submit_many([clip])
        return result

    async def submit_many(self, clips: list[torch.Tensor]) -> list[Result]:
        """Queue clips all together or not at all, and wait for each one's probabilities."""
        tickets = self.tickets(len(clips), asyncio.get_running_loop())
        self.enqueue(tickets, clips)
        return await self.wait(tickets)

    @staticmethod
    def tickets(count: int, loop: asyncio.AbstractEventLoop) -> list[Ticket]:
        """Places for ``count`` clips of one request, answered on ``loop``: the route waits on them
        (``wait``) while a decode thread decodes the clips and queues them (``enqueue``, or ``fail``)."""
        return [Ticket(loop.create_future(), loop) for _ in range(count)]

    def enqueue(self, tickets: list[Ticket], clips: list[torch.Tensor]) -> None:
        """Queue ``clips`` under ``tickets``, all together or not at all; from any thread.

        A decode thread queues the clip it has just decoded, and the worker starts on it
        without a turn of the event loop in between: the loop wakes once per request, for
        its answer (docs/PERFORMANCE.md).
        """
        now = time.perf_counter()
        with self._cond:
            if self._closing:
                raise Closed(f"model {self.name} is shutting down")
            if len(self._queue) + len(tickets) > self.max_queue:
                raise Overloaded(f"model {self.name} has {len(self._queue)} clips queued (limit {self.max_queue})")
            for ticket, clip in zip(tickets, clips, strict=True):
                ticket.clip, ticket.enqueued, ticket.deadline = clip, now, now + self.timeout_s
            self._queue.extend(tickets)
            self._cond.notify()

    def reserve(self, count: int) -> None:
        """Room for ``count`` clips read and still to be decoded, beside the queue: a burst of large
        uploads waits for the decoders no more than the queue allows. Overloaded when ``max_queue``
        are already waiting; ``release`` once they are decoded, failed or skipped."""
        with self._cond:
            if self._undecoded + count > self.max_queue:
                raise Overloaded(
                    f"model {self.name} has {self._undecoded} uploads waiting to be decoded (limit {self.max_queue})"
                )
            self._undecoded += count

    def release(self, count: int) -> None:
        with self._cond:
            self._undecoded -= count

    def abandoned(self, tickets: list[Ticket]) -> bool:
        """True when every one of ``tickets`` is already answered or withdrawn (timed out, or its client
        left): a decode thread that takes such a clip skips it, counted as dropped ("undecoded")."""
        with self._cond:
            gone = all(t.cancelled or t.future.done() for t in tickets)
        if gone:
            for _ in tickets:
                self._dropped("undecoded")
        return gone

    def fail(self, tickets: list[Ticket], exc: Exception) -> None:
        """Answer ``tickets`` with ``exc`` (e.g. their clip could not be decoded); from any thread."""
        for ticket in tickets:
            self._settle(ticket, exc=exc)

    async def wait(self, tickets: list[Ticket]) -> list[Result]:
        """The results of ``tickets``, in order; raises the first failure.

        The deadline covers waiting in the queue only: a clip whose batch has started
        is answered even if the batch ends after the deadline. If this is cancelled, or a
        clip fails, the request's clips still queued are withdrawn.
        """
        # One timer per request on the loop, not a wait_for per clip: each layer of futures
        # between the worker's answer and this coroutine is another turn of the event loop.
        expiry = _Expiry(self, tickets)
        try:
            return [await t.future for t in tickets]
        except BaseException:  # timed out, failed, or the caller went away: withdraw what is still queued
            self._withdraw(tickets)
            for t in tickets:  # the outcomes nobody awaits now: retrieved, so asyncio does not log them
                t.future.add_done_callback(_retrieve)
            raise
        finally:
            expiry.cancel()

    def _expire(self, tickets: list[Ticket], since: float) -> float | None:
        """On the loop: fail the request's clips that waited in the queue past their deadline (a
        started clip is answered late), or that are still not decoded ``decode_timeout_s`` after
        ``since`` (a decoder that hangs). Returns the seconds until the next check, None if none."""
        now = time.perf_counter()

        def limit(t: Ticket) -> float:
            return t.deadline if t.enqueued else since + self.decode_timeout_s

        with self._cond:
            waiting = [t for t in tickets if not t.started and not t.future.done()]
            if not waiting:
                return None
            deadline = min(limit(t) for t in waiting)
            if deadline > now:
                return min(deadline - now, self.timeout_s)
            decoding = any(not t.enqueued and limit(t) <= now for t in waiting)
            for t in waiting:
                t.cancelled = True
        reason = (
            f"not decoded within {self.decode_timeout_s:g} s"
            if decoding
            else f"waited more than {self.timeout_s:g} s in the queue"
        )
        for t in waiting:
            if not t.future.done():
                t.future.set_exception(TimedOut(reason))
        return None

    def _withdraw(self, pending: list[Ticket]) -> None:
        with self._cond:
            for p in pending:
                if not p.started:
                    p.cancelled = True
            gone = all(p.cancelled for p in pending)
        for p in pending if gone else []:
            if p.on_abandon is not None:
                try:
                    p.on_abandon()
                except Exception:  # the request is answered either way
                    log.exception("batcher %s: abandon callback failed", self.name)

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)

    # --- worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        inflight: _InFlight | None = None
        while True:
            batch = self._collect(block=inflight is None)
            if batch is None:
                return
            launched = self._guarded(self._start, batch) if batch else None
            if batch and launched is None:
                self._release()  # answered already (the CPU path, or it failed to start)
            if inflight is not None:
                self._guarded(self._finish, inflight)
                self._release()
            if self._after_batch is not None and (batch or inflight is not None):
                try:
                    self._after_batch()
                except Exception:  # housekeeping must never stop the worker
                    log.exception("batcher %s: after-batch hook failed", self.name)
            inflight = launched

    def _release(self) -> None:
        """A batch of this worker is answered: the others may start on a shorter queue again."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def _may_take(self) -> bool:
        """Called under the lock: whether this worker may start a batch now."""
        if not self._queue:
            return False
        if self._busy == 0 or len(self._queue) >= self.share_from:
            return True
        return sum(p.clip.shape[0] for p in self._queue) >= self.max_batch_frames

    def _guarded(self, step: Callable[..., _InFlight | None], arg: list[Ticket] | _InFlight) -> _InFlight | None:
        try:
            return step(arg)
        except Exception as exc:  # never let the worker die with clips in hand
            log.exception("batcher %s: unexpected error", self.name)
            for pending in arg.batch if isinstance(arg, _InFlight) else arg:
                self._settle(pending, exc=InferenceFailed(f"internal error: {exc}"))
            return None

    def _start(self, batch: list[Ticket]) -> _InFlight | None:
        """Run the batch now, or with ``launch`` start it and return it to finish later."""
        if self._launch is None:
            self._execute(batch)
            return None
        started = time.perf_counter()
        try:
            frames = torch.cat([p.clip for p in batch])
            lengths = torch.tensor([p.clip.shape[0] for p in batch])
            return _InFlight(batch, lengths, started, self._launch(frames, lengths))
        except Exception:
            self._execute(batch)  # it failed to start: run it the plain way, clip by clip if need be
            return None

    def _finish(self, inflight: _InFlight) -> None:
        try:
            probs = inflight.handle.wait()
            if probs.shape[0] != len(inflight.batch):
                raise RuntimeError(f"the model returned {probs.shape[0]} rows for {len(inflight.batch)} clips")
        except Exception:
            self._execute(inflight.batch)
            return
        self._answer(inflight.batch, inflight.lengths, inflight.started, probs)

    def _collect(self, block: bool = True) -> list[Ticket] | None:
        """The next batch; [] when ``block`` is false and nothing waits; None once closed and empty."""
        with self._cond:
            while block and not self._closing and not self._may_take():
                self._cond.wait()
            if not self._queue:
                return None if block else []  # closing, and everything accepted was answered
            if not self._closing and not self._may_take():
                return []  # not blocking, and another worker is busy with too few clips waiting
            if self.max_delay_s > 0 and not self._closing:
                self._wait_for_fuller_batch()
            batch: list[Ticket] = []
            frames = 0
            now = time.perf_counter()
            limit = self.max_batch_size
            if self.share_from == 1:  # an even share for this worker and each idle one
                idle = max(1, self.workers - self._busy)
                limit = min(limit, -(-len(self._queue) // idle))
            while self._queue and len(batch) < limit:
                head = self._queue[0]
                if head.cancelled or head.future.done():
                    self._queue.popleft().clip = _NO_CLIP  # a failed request's ticket may live on in a cycle
                    self._dropped("cancelled")
                    continue
                if now > head.deadline:
                    self._queue.popleft()
                    self._dropped("timeout")
                    self._settle(head, exc=TimedOut(f"waited more than {self.timeout_s:g} s in the queue"))
                    continue
                n = head.clip.shape[0]
                if batch and frames + n > self.max_batch_frames:
                    break
                head.started = True
                batch.append(self._queue.popleft())
                frames += n
            if batch:
                self._busy += 1
                if self._queue:
                    self._cond.notify()  # what is left may be another worker's (its share, or share_from)
            return batch

    def _dropped(self, reason: str) -> None:
        try:
            self._on_drop(reason)
        except Exception:  # a metrics callback must never stop the worker
            log.exception("batcher %s: drop callback failed", self.name)

    def _wait_for_fuller_batch(self) -> None:
        until = self._queue[0].enqueued + self.max_delay_s
        while not self._closing and len(self._queue) < self.max_batch_size:
            if sum(p.clip.shape[0] for p in self._queue) >= self.max_batch_frames:
                return
            left = until - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _run_now(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._launch(frames, lengths).wait() if self._launch is not None else self._forward(frames, lengths)

    def _execute(self, batch: list[Ticket]) -> None:
        started = time.perf_counter()
        try:
            frames = torch.cat([p.clip for p in batch])  # (N, C, H, W)
            lengths = torch.tensor([p.clip.shape[0] for p in batch])
            probs = self._run_now(frames, lengths)  # (B, K)
            if probs.shape[0] != len(batch):
                raise RuntimeError(f"the model returned {probs.shape[0]} rows for {len(batch)} clips")
        except Exception as exc:
            if len(batch) == 1:
                log.warning("model %s failed on a clip of %d frames: %s", self.name, batch[0].clip.shape[0], exc)
                self._settle(batch[0], exc=InferenceFailed(str(exc)))
                return
            log.warning("batch of %d on %s failed (%s); retrying clip by clip", len(batch), self.name, exc)
            for pending in batch:
                self._execute([pending])
            return
        self._answer(batch, lengths, started, probs)

    def _answer(self, batch: list[Ticket], lengths: torch.Tensor, started: float, probs: torch.Tensor) -> None:
        spent = time.perf_counter() - started
        try:  # statistics first, so metrics read after an answer already count its batch
            self._on_batch(BatchStats(len(batch), int(lengths.sum()), [started - p.enqueued for p in batch], spent))
        except Exception:
            log.exception("batcher %s: batch statistics callback failed", self.name)
        for pending, row in zip(batch, probs, strict=True):
            result = Result(row, started - pending.enqueued, spent, len(batch), int(pending.clip.shape[0]))
            self._settle(pending, result)

    @staticmethod
    def _settle(pending: Ticket, result: Result | None = None, exc: Exception | None = None) -> None:
        pending.clip = _NO_CLIP  # answered: its frames need not live as long as the request does

        def apply() -> None:
            if pending.future.done():
                return
            if exc is not None:
                pending.future.set_exception(exc)
            else:
                pending.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting any more
            pending.loop.call_soon_threadsafe(apply)
