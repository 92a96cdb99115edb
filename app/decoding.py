"""Where uploads are decoded, off the event loop: on the decode threads (a large clip split over
two of them), or in decode processes (``DECODE_PROCESSES``, ``app.processes``).

A decode is asked between frames whether it is still wanted, and stops once its request has timed
out or its client has left. On the threads, videos (the long decodes) take at most all threads but
one at a time: the others wait in line without holding a thread, so images keep a thread to decode
on however many videos arrive.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from app.errors import NotReady
from app.processes import ProcessDecoders, decode_flagged
from app.uploads import FrameSplitter, Parsed, Target, Upload, decode_parsed, parse_upload
from media import Stopped

T = TypeVar("T")
Done = Callable[[np.ndarray | None, BaseException | None], None]
Work = Callable[[], None]


class VideoShare:
    """At most ``limit`` video decodes at once; the rest wait in line, each run by the thread of a video
    decode that finishes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.running = limit, 0
        self.waiting: deque[Work] = deque()
        self._lock = threading.Lock()

    def admit(self, work: Work) -> bool:
        """True when ``work`` may run now; else it waits in line."""
        with self._lock:
            if self.running < self.limit:
                self.running += 1
                return True
            self.waiting.append(work)
            return False

    def run(self, work: Work) -> None:
        """Run ``work``, then each video that waits, on this thread."""
        next_work: Work | None = work
        while next_work is not None:
            next_work()
            with self._lock:
                next_work = self.waiting.popleft() if self.waiting else None
                if next_work is None:
                    self.running -= 1


class Decoders:
    def __init__(self, threads: int, processes: int = 0, split_bytes: int = 0) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.processes = ProcessDecoders(processes) if processes else None
        # a decode process never splits a clip: the split is over this process's threads
        self.splitter = FrameSplitter(self.pool, split_bytes) if split_bytes > 0 and not processes else None
        self.videos = VideoShare(max(1, threads - 1))

    @property
    def restarts(self) -> int:
        """Times the decode processes were replaced after one died."""
        return self.processes.restarts if self.processes is not None else 0

    def start(self) -> list[int]:
        """Start the decode processes, if any, before the first request; their pids."""
        return self.processes.start() if self.processes is not None else []

    def decode(
        self, upload: Upload, target: Target, done: Done, skip: Callable[[], bool]
    ) -> Callable[[], object] | None:
        """Decode ``upload`` for ``target``; then ``done(array, None)`` or ``done(None, exc)`` once, on a
        decode thread or on a thread of the process pool. ``skip()`` is true once the request has ended:
        a job not started then is not decoded, one running stops between frames, and ``done`` gets a
        ``CancelledError``. Returns what withdraws a job from a decode process."""
        if self.processes is not None:
            return self._in_process(upload, target, done)
        try:
            self.pool.submit(self._parse, upload, target, done, skip)
        except RuntimeError as exc:  # the pool is shut down: the server is stopping
            raise NotReady("the server is shutting down") from exc
        return None

    def _parse(self, upload: Upload, target: Target, done: Done, skip: Callable[[], bool]) -> None:
        if skip():
            done(None, CancelledError())
            return
        try:
            parsed = parse_upload(upload, target)
        except Exception as exc:
            done(None, exc)
            return
        work = partial(self._decode, parsed, target, done, skip)
        if parsed.video is None:
            work()
        elif self.videos.admit(work):
            self.videos.run(work)

    def _decode(self, parsed: Parsed, target: Target, done: Done, skip: Callable[[], bool]) -> None:
        try:
            if skip():
                raise Stopped("the decode is no longer wanted")
            array = decode_parsed(parsed, target, self.splitter, skip)
        except Stopped:
            done(None, CancelledError())
        except Exception as exc:
            done(None, exc)
        else:
            done(array, None)

    def _in_process(self, upload: Upload, target: Target, done: Done) -> Callable[[], object]:
        assert self.processes is not None
        flags = self.processes.flags
        held = flags.take()

        def finished(array: np.ndarray | None, exc: BaseException | None) -> None:
            flags.give_back(held)
            if isinstance(exc, Stopped):
                exc = CancelledError()
            done(array, exc)

        future = self.processes.submit(finished, decode_flagged, held[0] if held else None, upload, target)

        def withdraw() -> None:
            future.cancel()  # still waiting for a process: skipped
            flags.set(held)  # running: it stops at its next frame

        return withdraw

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread: CPU-bound work kept off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        """Finish the jobs in hand, then stop the threads and processes."""
        self.pool.shutdown(wait=True)
        if self.processes is not None:
            self.processes.shutdown()
