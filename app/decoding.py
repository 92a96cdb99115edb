"""Where uploads are decoded, off the event loop: on the decode threads (a large clip split over
two of them), or in decode processes (``DECODE_PROCESSES``, ``app.processes``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from app.errors import NotReady
from app.processes import ProcessDecoders
from app.uploads import FrameSplitter, Target, Upload, decode_upload

T = TypeVar("T")
Done = Callable[[np.ndarray | None, BaseException | None], None]


class Decoders:
    def __init__(self, threads: int, processes: int = 0, split_bytes: int = 0) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.processes = ProcessDecoders(processes) if processes else None
        # a decode process never splits a clip: the split is over this process's threads
        self.splitter = FrameSplitter(self.pool, split_bytes) if split_bytes > 0 and not processes else None

    @property
    def restarts(self) -> int:
        """Times the decode processes were replaced after one died."""
        return self.processes.restarts if self.processes is not None else 0

    def start(self) -> list[int]:
        """Start the decode processes, if any, before the first request; their pids."""
        return self.processes.start() if self.processes is not None else []

    def decode(self, upload: Upload, target: Target, done: Done, skip: Callable[[], bool]) -> Callable[[], bool] | None:
        """Decode ``upload`` for ``target``; then ``done(array, None)`` or ``done(None, exc)`` once, on a
        decode thread, or on a thread of the process pool. A job whose request has ended by the time it
        would start (``skip()``, on the threads; the returned cancel, for a job still waiting for a
        process) is not decoded: ``done`` gets a ``CancelledError``."""
        if self.processes is not None:
            return self.processes.submit(done, decode_upload, upload, target).cancel

        def job() -> None:
            if skip():
                done(None, CancelledError())
                return
            try:
                array = decode_upload(upload, target, self.splitter)
            except Exception as exc:
                done(None, exc)
                return
            done(array, None)

        try:
            self.pool.submit(job)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            raise NotReady("the server is shutting down") from exc
        return None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread: CPU-bound work kept off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        """Finish the jobs in hand, then stop the threads and processes."""
        self.pool.shutdown(wait=True)
        if self.processes is not None:
            self.processes.shutdown()
