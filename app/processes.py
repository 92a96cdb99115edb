"""Decoding in worker processes (``DECODE_PROCESSES``), for machines with cores to spare.

On threads, decoding shares the server process's interpreter lock with the event loop and
the batcher, which caps what one process can feed a GPU (docs/performance.md: GPU). Here the
body goes to a process of a ``spawn`` pool, which splits the form, decodes and resizes the
frames and sends back one uint8 array (T, H, W, C); the server's process only wraps it in a
tensor and queues it, so every clip still meets one batcher. A decode process imports
``app.uploads`` and ``media``, no torch, and holds a fraction of the server's memory.

A decode process that dies (killed, out of memory, a crash in a codec) breaks the pool, and
the pool stops its other processes too: every job it held fails together. The pool is
replaced and those jobs are decoded again in the new one; a job caught in a second break
is tried once more alone, in a pool of one process of its own, so a clip that kills every
process it meets ends in a 503 (``Retry-After``) without taking other requests with it.
The decode processes ignore SIGINT: a Ctrl-C in a terminal reaches the whole process
group, and the server, not its helpers, decides when decoding stops (it shuts the pool
down once the requests in hand are answered).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

import app.uploads
from app.errors import DecoderFailed, NotReady

log = logging.getLogger(__name__)


def process_id(delay_s: float = 0.0) -> int:
    """In a decode process: its pid, after ``delay_s`` (the pool starts every process with it)."""
    time.sleep(delay_s)
    return os.getpid()


# In a decode process: the flags its jobs read between frames (set by ``start_decoder``, per process)
_flags: Any = None


def start_decoder(flags: Any = None) -> None:
    """In a decode process, first. SIGINT is the server's to act on: a terminal's Ctrl-C reaches the
    whole process group, and the server shuts its decode processes down once it has answered what it
    accepted (SIGTERM stays: the pool stops the processes of a broken pool with it). ``flags`` are the
    server's ``CancelFlags``, shared memory."""
    global _flags
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _flags = flags


def decode_flagged(slot: int | None, upload: app.uploads.Upload, target: app.uploads.Target) -> np.ndarray:
    """In a decode process: ``upload`` decoded, stopping between frames once the server sets ``slot``'s flag."""
    flags = _flags
    stop = None if slot is None or flags is None else (lambda: flags[slot] != 0)
    return app.uploads.decode_upload(upload, target, None, stop)


class CancelFlags:
    """One byte of shared memory per decode job in flight: set, the process decoding it stops at its
    next frame (a job whose request timed out or whose client left). A slot is a job's until the job
    is over; a request that ends later cannot set a slot another job holds by then."""

    def __init__(self, context: Any, slots: int = 1024) -> None:
        self.array = context.RawArray("b", slots)
        self._free = list(range(slots))
        self._owners: dict[int, object] = {}
        self._lock = threading.Lock()

    def take(self) -> tuple[int, object] | None:
        """A free slot, cleared, and the token that owns it; None when every slot is in use (the job then
        cannot be stopped early)."""
        with self._lock:
            if not self._free:
                return None
            slot, token = self._free.pop(), object()
            self._owners[slot] = token
            return slot, token

    def set(self, held: tuple[int, object] | None) -> None:
        with self._lock:
            if held is not None and self._owners.get(held[0]) is held[1]:
                self.array[held[0]] = 1

    def give_back(self, held: tuple[int, object] | None) -> None:
        with self._lock:
            if held is not None and self._owners.pop(held[0], None) is held[1]:
                self.array[held[0]] = 0
                self._free.append(held[0])


Done = Callable[[np.ndarray | None, BaseException | None], None]


class ProcessDecoders:
    """A pool of ``processes`` spawned decode processes that replaces itself when one dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.restarts = 0  # shared pools replaced after a decode process died
        self._context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self.flags = CancelFlags(self._context)
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool(processes)

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            processes, mp_context=self._context, initializer=start_decoder, initargs=(self.flags.array,)
        )

    def start(self, timeout_s: float = 120.0) -> list[int]:
        """Start every process now (each imports this module, and with it the decoders), not on the
        first requests; returns their pids. Short jobs go out until each process has answered one."""
        seen: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(seen) < self.processes and time.monotonic() < deadline:
            seen.update(self._pool.map(process_id, [0.02] * (self.processes * 2)))
        return sorted(seen)

    def submit(self, done: Done, decode: Callable[..., np.ndarray], *args: Any, attempt: int = 0) -> Future[np.ndarray]:
        """Decode in a process; ``done(array, None)`` or ``done(None, exc)`` is called once, on one of
        the pool's threads in this process (or on the caller's, when the job is already over).
        ``attempt``: 0 first, 1 after a break (the new shared pool), 2 alone in a pool of its own.
        Returns the job's future: cancelling it while the job still waits for a process skips the
        job (``done`` gets a ``CancelledError``)."""
        pool = self._pool if attempt < 2 else self._new_pool(1)
        try:
            try:
                future = pool.submit(decode, *args)
            except BrokenProcessPool:  # a process died since the last job: this one goes to a new pool
                pool = self._replace(pool)
                future = pool.submit(decode, *args)
        except RuntimeError as exc:  # shut down (BrokenProcessPool too, once closing): the server is stopping
            raise NotReady("the server is shutting down") from exc
        future.add_done_callback(lambda f: self._finished(f, pool, done, decode, args, attempt))
        return future

    def _finished(
        self, future: Future[np.ndarray], pool: ProcessPoolExecutor, done: Done, decode: Any, args: Any, attempt: int
    ) -> None:
        try:
            if attempt == 2:
                pool.shutdown(wait=False)  # a pool of one job
            try:
                exc = future.exception()
            except BaseException as cancelled:  # cancelled: reported like any failure
                exc = cancelled
            if isinstance(exc, BrokenProcessPool):
                if attempt < 2 and not self._closed:
                    log.warning("a decode process died; its pool's clips are decoded again (attempt %d)", attempt + 2)
                    self._replace(pool)  # the shared pool (a no-op once another job has replaced it)
                    self.submit(done, decode, *args, attempt=attempt + 1)
                    return
                exc = DecoderFailed("a decode process stopped while decoding this clip; try again")
            done(None if exc else future.result(), exc)
        except Exception as failed:  # never leave the request waiting: it gets this failure instead
            log.exception("decode job bookkeeping failed")
            done(None, failed)

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is broken and not self._closed:
                self._pool = self._new_pool(self.processes)
                self.restarts += 1
                broken.shutdown(wait=False)
            return self._pool

    def shutdown(self) -> None:
        """Finish the jobs in hand, then stop the processes."""
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=True)
