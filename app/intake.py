"""The one way into a model: an upload from its bytes to its answer.

``Intake.classify`` takes an upload as the route read it, reserves its place among the
model's uploads waiting to be decoded, starts its decoding off the event loop, and awaits
the answer. The decode thread (or the pool thread of a decode process) queues the decoded
clip itself, so a worker starts on it without a turn of the event loop; the loop wakes once,
for the answer. ``classify_clips`` does the same for clips already decoded (KServe tensors).

Both deadlines are watched by one timer per request (``Deadlines``): ``DECODE_TIMEOUT_S``
from the start until the clip is queued, then ``REQUEST_TIMEOUT_S`` in the queue. A request
that times out, fails, or whose client leaves withdraws its clips: a clip still queued is
dropped before compute, one still waiting for a decode thread is not decoded, one still
waiting for a decode process is cancelled there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch

from app.batching import ClipQueue, Result, Ticket, new_tickets, settle
from app.decoding import Decoders
from app.errors import ClientGone, DecoderFailed, Overloaded, TimedOut
from app.preprocess import array_to_clip
from app.served import ServedModel
from app.uploads import Upload

T = TypeVar("T")
log = logging.getLogger(__name__)
Disconnected = Callable[[], Awaitable[object]]  # returns once the client has gone


@dataclass(frozen=True)
class Answer:
    result: Result
    queued_at: float  # time.perf_counter() when the decoded clip was queued


class Slots:
    """Uploads of one model read and still to be decoded, at most ``limit`` (MAX_QUEUE, beside the
    queue): a burst of large uploads waits for the decoders no longer than the queue allows."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit, self.taken = name, limit, 0
        self._lock = threading.Lock()

    def reserve(self, count: int) -> None:
        with self._lock:
            if self.taken + count > self.limit:
                raise Overloaded(
                    f"model {self.name} has {self.taken} uploads waiting to be decoded (limit {self.limit})"
                )
            self.taken += count

    def release(self, count: int) -> None:
        with self._lock:
            self.taken -= count


class Deadlines:
    """One request's timer on the event loop, re-armed until none of its clips waits.

    No reference cycle outlives the request: ``cancel`` cancels the loop's handle, and asyncio
    clears a cancelled handle's callback, the one reference back to this object (a closure that
    re-armed itself would hold the request's clips until the cyclic collector ran).
    """

    __slots__ = ("decode_timeout_s", "queue", "tickets", "timer")

    def __init__(self, queue: ClipQueue, tickets: list[Ticket], decode_timeout_s: float) -> None:
        self.queue, self.tickets, self.decode_timeout_s = queue, tickets, decode_timeout_s
        first = min(queue.policy.timeout_s, decode_timeout_s)
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(first, self.check)

    def check(self) -> None:
        self.timer = None
        now = time.perf_counter()
        deadline, expired = self.queue.expire(self.tickets, now)
        if deadline is None:
            return
        if not expired:  # at most a queue timeout away: a clip queued since may be due sooner
            later = min(deadline - now, self.queue.policy.timeout_s)
            self.timer = asyncio.get_running_loop().call_later(later, self.check)
            return
        decoding = any(not t.enqueued for t in expired)
        reason = (
            f"not decoded within {self.decode_timeout_s:g} s"
            if decoding
            else f"waited more than {self.queue.policy.timeout_s:g} s in the queue"
        )
        for t in expired:
            if not t.future.done():
                t.future.set_exception(TimedOut(reason))

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Intake:
    def __init__(self, decoders: Decoders, models: dict[str, ServedModel], decode_timeout_s: float) -> None:
        self.decoders, self.decode_timeout_s = decoders, decode_timeout_s
        self._slots = {name: Slots(name, served.batcher.policy.max_queue) for name, served in models.items()}

    async def classify(self, served: ServedModel, upload: Upload, disconnected: Disconnected) -> Answer:
        """Decode ``upload`` into one clip for ``served``, queue it, and wait for its answer."""
        queue, slots = served.batcher.queue, self._slots[served.name]
        tickets = new_tickets(1, deadline=time.perf_counter() + self.decode_timeout_s)
        slots.reserve(1)
        done = partial(self._decoded, queue, slots, tickets)
        try:
            cancel = self.decoders.decode(upload, served.target, done, partial(queue.abandoned, tickets))
        except BaseException:
            slots.release(1)
            raise
        [result] = await self._answers(queue, tickets, disconnected, cancel)
        return Answer(result, tickets[0].enqueued)

    async def classify_clips(
        self, served: ServedModel, clips: list[torch.Tensor], disconnected: Disconnected
    ) -> list[Result]:
        """Queue ``clips`` (T, C, H, W), decoded already, all or none, and wait for their answers."""
        queue = served.batcher.queue
        tickets = new_tickets(len(clips))
        queue.enqueue(tickets, clips)
        return await self._answers(queue, tickets, disconnected)

    @contextlib.contextmanager
    def holding(self, served: ServedModel) -> Iterator[None]:
        """One of ``served``'s upload places (MAX_QUEUE) held for the block: a timeline or an explanation,
        which decodes and runs beside the batcher, counts as an upload waiting for the decoders
        (``Overloaded`` when they are all taken)."""
        slots = self._slots[served.name]
        slots.reserve(1)
        try:
            yield
        finally:
            slots.release(1)

    def saturated(self) -> bool:
        """Whether every model's uploads waiting to be decoded are at their limit: new ones would get 503."""
        return all(slots.taken >= slots.limit for slots in self._slots.values())

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread (parsing and validating a request body, say)."""
        return await self.decoders.run(fn, *args)

    @staticmethod
    def _decoded(
        queue: ClipQueue,
        slots: Slots,
        tickets: list[Ticket],
        array: np.ndarray | torch.Tensor | None,
        exc: BaseException | None,
    ) -> None:
        """On a decode thread: queue the decoded clip, or answer its tickets with the failure."""
        try:
            if isinstance(exc, CancelledError) and queue.abandoned(tickets):  # its request ended first
                for _ in tickets:
                    queue.dropped("undecoded")
            elif isinstance(exc, CancelledError):  # stopped though its request goes on: never left waiting
                for t in tickets:
                    settle(t, exc=DecoderFailed("the decode of this upload was stopped; try again"))
            elif exc is not None:
                for t in tickets:
                    settle(t, exc=exc)
            else:
                try:
                    clip = array if isinstance(array, torch.Tensor) else array_to_clip(array)  # type: ignore[arg-type]
                    queue.enqueue(tickets, [clip])  # decoded on the device already, or wrapped without a copy
                except Exception as refused:  # a full queue, or shutting down
                    for t in tickets:
                        settle(t, exc=refused)
        finally:
            slots.release(len(tickets))

    async def _answers(
        self,
        queue: ClipQueue,
        tickets: list[Ticket],
        disconnected: Disconnected,
        cancel: Callable[[], object] | None = None,
    ) -> list[Result]:
        """The results of ``tickets`` in order; the first failure is raised, and the request's clips
        that have not started are withdrawn (``cancel`` too, when none had started).

        The futures are awaited here, not through a task around them: the worker's answer reaches
        this coroutine in one turn of the event loop.
        """
        deadlines = Deadlines(queue, tickets, self.decode_timeout_s)
        watcher = asyncio.ensure_future(disconnected())
        watcher.add_done_callback(partial(_client_gone, tickets))
        try:
            return [await t.future for t in tickets]
        except BaseException:
            if queue.withdraw(tickets) and cancel is not None:
                try:
                    cancel()
                except Exception:  # the request is answered either way
                    log.exception("cancelling a decode job failed")
            for t in tickets:  # the outcomes nobody awaits now: retrieved, so asyncio does not log them
                t.future.add_done_callback(_retrieve)
            raise
        finally:
            deadlines.cancel()
            watcher.cancel()


def _client_gone(tickets: list[Ticket], watcher: asyncio.Future[object]) -> None:
    if watcher.cancelled():
        return  # answered first
    watcher.exception()  # retrieved: a receive that failed means the connection is gone too
    for t in tickets:
        if not t.future.done():
            t.future.set_exception(ClientGone())


def _retrieve(future: asyncio.Future[Result]) -> None:
    if not future.cancelled():
        future.exception()
