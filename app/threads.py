"""torch's intra-op threads on the CPU, shared by the forward passes that run at the same time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from host.threads import name_os_thread

T = TypeVar("T")

# torch's intra-op threads as the process started (its own default, or OMP_NUM_THREADS), read
# before CpuThreads holds every thread but its lane at one
STARTUP_THREADS = torch.get_num_threads()


class CpuThreads:
    """torch's intra-op threads, shared among the CPU forward passes that run at the same time.

    A pass that runs alone gets every thread (lowest latency); two at once (``INSTANCES=2``, or two
    models) get half each, instead of twice as many threads as cores waiting for one another at
    every parallel region.

    With ``wide_lane`` (the default), a pass that gets every thread runs on one thread kept for
    that. libgomp, torch's OpenMP, keeps a team of worker threads for each thread that ever ran a
    parallel region on more than one thread, and once those teams together hold more threads than
    there are cores, its workers sleep between parallel regions instead of spinning, and small
    passes slow down (docs/performance.md: CPU threads). Here only the lane ever runs more than
    one thread, and every other thread of the server is held at one (``torch.set_num_threads(1)``
    also sets the count threads started later take), so the one team stays within the cores. A
    pass that shares runs on its caller's thread, at its share. A pass that would start beside
    one on the lane waits for it instead, rather than put one thread more than there are cores
    beside the lane's spinning team.

    Without the lane each pass sets its caller's team size just before it starts.
    """

    def __init__(self, total: int, wide_lane: bool = True) -> None:
        self.total = max(1, total)
        self._running = 0  # passes running
        self._waiting = 0  # passes waiting for the one on the lane
        self._wide = False  # a pass runs on the lane
        self._cond = threading.Condition()
        self._lane: ThreadPoolExecutor | None = None
        if wide_lane and self.total > 1:
            self._lane = ThreadPoolExecutor(1, thread_name_prefix="torch-wide", initializer=self._size_lane)
            self._lane.submit(torch.get_num_threads).result()  # started and sized before the others drop to one
            torch.set_num_threads(1)  # this thread, and the default of threads started from now on

    def _size_lane(self) -> None:
        name_os_thread()
        torch.set_num_threads(self.total)
        torch.get_num_threads()  # torch's per-thread lazy set-up, done now: later it would take the default

    @property
    def wide_lane(self) -> bool:
        return self._lane is not None

    @property
    def waiting(self) -> int:
        """Passes waiting for the one on the lane to finish."""
        return self._waiting

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` at this pass's share of the threads: on the lane when it gets them all."""
        return self._run(fn, args, narrow=False)

    def run_narrow(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this thread, on one torch thread: for a small pass after a pause, whose team
        of threads would have gone to sleep (on a virtual machine, waking it can cost ten times the
        pass: docs/streams.md)."""
        return self._run(fn, args, narrow=True)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], narrow: bool) -> T:
        if self._lane is None:
            return self._run_here(fn, args, narrow)
        with self._cond:
            # a pass on every thread is not joined by another, which would put one thread more than
            # there are cores to work beside its spinning team: wait for it (it is the faster of the two)
            self._waiting += 1
            while self._wide:
                self._cond.wait()
            self._waiting -= 1
            self._running += 1
            wide = self._wide = self._running == 1 and self._waiting == 0 and not narrow
            threads = self.total if wide else max(1, self.total // (self._running + self._waiting))
            if narrow:
                threads = 1
        try:
            if wide:
                return self._lane.submit(fn, *args).result()
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            return fn(*args)
        finally:
            with self._cond:
                self._running -= 1
                if wide:
                    self._wide = False
                    self._cond.notify_all()

    def _run_here(self, fn: Callable[..., T], args: tuple[Any, ...], narrow: bool = False) -> T:
        with self._cond:
            self._running += 1
            threads = 1 if narrow else max(1, self.total // self._running)
        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._running -= 1
            # set_num_threads also sets the default of threads started later: leave that at the total
            torch.set_num_threads(self.total)

    def close(self) -> None:
        """Stop the lane; threads started from now on take the whole count again."""
        if self._lane is not None:
            self._lane.shutdown(wait=True)
            self._lane = None
            torch.set_num_threads(self.total)
