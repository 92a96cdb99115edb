"""Decoding in worker processes (``DECODE_PROCESSES``), for machines with cores to spare.

On threads (the default), decoding shares the server process's interpreter lock with
the event loop and the batcher: for small frames most of a clip's decode is Python
around Pillow's C code, so one process tops out near 170-180 clips/s however many cores
and however fast the GPU (docs/PERFORMANCE.md, GPU section). Here the body goes to a
process of a ``spawn`` pool, which splits the form, decodes and resizes the frames and
sends back one uint8 array (T, H, W, C); the server's process only wraps it in a tensor
and queues it, so every clip still meets one batcher. The decoders live in ``app.decode``,
which imports no torch: a decode process holds about a third of the server's memory.

A decode process that dies (killed, out of memory, a crash in a codec) breaks the pool:
the pool is replaced and each job it held is tried once more in the new one; one that
fails twice is answered 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from app.decode import process_id
from app.errors import ApiError, not_ready

log = logging.getLogger(__name__)

Done = Callable[[np.ndarray | None, BaseException | None], None]


class ProcessDecoders:
    """A pool of ``processes`` spawned decode processes that replaces itself when one dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.restarts = 0  # pools replaced after a decode process died
        self._context = multiprocessing.get_context("spawn")  # never fork a process that holds torch's threads
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=self._context)

    def start(self) -> list[int]:
        """Start every process now (each imports ``app.decode``), not on the first requests; returns
        their pids."""
        return sorted(set(self._pool.map(process_id, range(self.processes * 4))))

    def submit(self, done: Done, decode: Callable[..., np.ndarray], *args: Any, retry: bool = True) -> None:
        """Decode in a process; ``done(array, None)`` or ``done(None, exc)`` is called on one of the
        pool's threads in this process."""
        pool = self._pool
        try:
            try:
                future = pool.submit(decode, *args)
            except BrokenProcessPool:  # a process died since the last job: this one goes to a new pool
                pool = self._replace(pool)
                future = pool.submit(decode, *args)
        except RuntimeError as exc:  # shut down (BrokenProcessPool too, once closing): the server is stopping
            raise not_ready("the server is shutting down") from exc
        future.add_done_callback(lambda f: self._finished(f, pool, done, decode, args, retry))

    def _finished(
        self, future: Future[np.ndarray], pool: ProcessPoolExecutor, done: Done, decode: Any, args: Any, retry: bool
    ) -> None:
        try:
            exc = future.exception()
        except BaseException as cancelled:  # cancelled: reported like any failure
            exc = cancelled
        if isinstance(exc, BrokenProcessPool):
            if retry and not self._closed:
                log.warning("a decode process died; the pool is replaced and the clip decoded again")
                self._replace(pool)
                try:
                    self.submit(done, decode, *args, retry=False)
                except Exception as again:  # reported to the waiting request
                    done(None, again)
                return
            exc = ApiError(
                503,
                "decoder_failed",
                "a decode process stopped while decoding this clip; try again",
                {"Retry-After": "1"},
            )
        done(None if exc else future.result(), exc)

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is broken and not self._closed:
                self._pool = self._new_pool()
                self.restarts += 1
                broken.shutdown(wait=False)
            return self._pool

    def shutdown(self) -> None:
        """Finish the jobs in hand, then stop the processes."""
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=True)
