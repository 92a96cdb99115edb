"""One model's bounded queue of clips: admission, deadlines, and which clips make the next batch.

The event loop and the decode threads put clips in (``enqueue``); the model's worker threads
take batches out (``take``). Everything here runs under one lock, briefly; nothing waits on
the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from app.batching.policy import BatchPolicy
from app.batching.tickets import NO_CLIP, Ticket, settle
from app.errors import Closed, Overloaded, TimedOut

log = logging.getLogger(__name__)


class ClipQueue:
    def __init__(self, name: str, policy: BatchPolicy, on_drop: Callable[[str], None] | None = None) -> None:
        self.name, self.policy = name, policy
        self._on_drop = on_drop or (lambda reason: None)
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = 0  # batches taken and not yet answered

    @property
    def depth(self) -> int:
        return len(self._queue)

    def enqueue(self, tickets: list[Ticket], clips: list[torch.Tensor]) -> None:
        """Queue ``clips`` (T, C, H, W) under ``tickets``, all together or not at all; from any thread.
        A decode thread queues the clip it has just decoded, and a worker starts on it without a
        turn of the event loop in between."""
        now = time.perf_counter()
        with self._cond:
            if self._closing:
                raise Closed(f"model {self.name} is shutting down")
            if len(self._queue) + len(tickets) > self.policy.max_queue:
                raise Overloaded(
                    f"model {self.name} has {len(self._queue)} clips queued (limit {self.policy.max_queue})"
                )
            for ticket, clip in zip(tickets, clips, strict=True):
                ticket.clip, ticket.enqueued, ticket.deadline = clip, now, now + self.policy.timeout_s
            self._queue.extend(tickets)
            self._cond.notify()

    def abandoned(self, tickets: list[Ticket]) -> bool:
        """True when every one of ``tickets`` is answered or withdrawn already (its request timed out,
        failed, or its client left): a clip not yet decoded then need not be."""
        with self._cond:
            return all(t.cancelled or t.future.done() for t in tickets)

    def withdraw(self, tickets: list[Ticket]) -> bool:
        """Withdraw the request's clips that have not started (their request failed, timed out or its
        client left); True when none of them had started."""
        with self._cond:
            for t in tickets:
                if not t.started:
                    t.cancelled = True
            return all(t.cancelled for t in tickets)

    def expire(self, tickets: list[Ticket], now: float) -> tuple[float | None, list[Ticket]]:
        """(the earliest deadline of the request's clips still waiting, or None when none waits;
        the waiting clips, withdrawn, once that deadline has passed). A started clip is answered late."""
        with self._cond:
            waiting = [t for t in tickets if not t.started and not t.future.done()]
            if not waiting:
                return None, []
            deadline = min(t.deadline for t in waiting)
            if deadline > now:
                return deadline, []
            for t in waiting:
                t.cancelled = True
            return deadline, waiting

    def close(self) -> None:
        """Take no new clips; the workers answer what is queued, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def dropped(self, reason: str) -> None:
        try:
            self._on_drop(reason)
        except Exception:  # a metrics callback must never stop a worker
            log.exception("queue %s: drop callback failed", self.name)

    # --- the workers' side ---------------------------------------------------------------

    def take(self, workers: int, block: bool = True) -> list[Ticket] | None:
        """The next batch; [] when ``block`` is false and there is none to take now; None once closed
        and empty. Clips that timed out or were withdrawn are dropped here, before compute."""
        with self._cond:
            while block and not self._closing and not self._may_take():
                self._cond.wait()
            if not self._queue:
                return None if block else []  # closing, and everything accepted was answered
            if not self._closing and not self._may_take():
                return []  # not blocking, and another worker is busy with too few clips waiting
            if self.policy.max_delay_s > 0 and not self._closing:
                self._wait_for_fuller_batch()
            batch = self._pop_batch(self._limit(workers))
            if batch:
                self._busy += 1
                if self._queue:
                    self._cond.notify()  # what is left may be another worker's (its share, or share_from)
            return batch

    def batch_done(self) -> None:
        """A taken batch is answered: the other workers may start on a shorter queue again."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def _may_take(self) -> bool:
        if not self._queue:
            return False
        if self._busy == 0 or len(self._queue) >= self.policy.share_from:
            return True
        return self._frames_waiting() >= self.policy.max_batch_frames

    def _frames_waiting(self) -> int:
        return sum(t.clip.shape[0] for t in self._queue)

    def _limit(self, workers: int) -> int:
        """With ``share_from`` 1 (a model that does not gain from batching) a worker takes only its
        share of what waits, split among itself and the idle workers."""
        if self.policy.share_from > 1:
            return self.policy.max_batch_size
        idle = max(1, workers - self._busy)
        return min(self.policy.max_batch_size, -(-len(self._queue) // idle))

    def _pop_batch(self, limit: int) -> list[Ticket]:
        batch: list[Ticket] = []
        frames = 0
        now = time.perf_counter()
        while self._queue and len(batch) < limit:
            head = self._queue[0]
            if head.cancelled or head.future.done():
                head.clip = NO_CLIP  # a failed request's ticket may live on in a cycle
                self._queue.popleft()
                self.dropped("cancelled")
                continue
            if now > head.deadline:
                self._queue.popleft()
                self.dropped("timeout")
                settle(head, exc=TimedOut(f"waited more than {self.policy.timeout_s:g} s in the queue"))
                continue
            n = head.clip.shape[0]
            if batch and frames + n > self.policy.max_batch_frames:
                break
            head.started = True
            batch.append(self._queue.popleft())
            frames += n
        return batch

    def _wait_for_fuller_batch(self) -> None:
        until = self._queue[0].enqueued + self.policy.max_delay_s
        while not self._closing and len(self._queue) < self.policy.max_batch_size:
            if self._frames_waiting() >= self.policy.max_batch_frames:
                return
            left = until - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)
