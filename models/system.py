"""Process-level tuning shared by training and serving."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
import time

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31, arenas: int = 1) -> bool:
    """Keep glibc from mapping and unmapping fresh pages for every large tensor.

    With glibc's defaults, each forward/backward pass allocates its activations with
    mmap and returns them with munmap, so every step page-faults its memory anew
    (visible as high system CPU time). Raising the mmap and trim thresholds keeps
    freed blocks in the heap for reuse. Threads other than the main one get arenas of
    their own whose heaps hold at most 64 MiB, so a batch's larger activations are
    mapped afresh whatever the threshold: the server's forward pass runs in a worker
    thread, where batches of 8 seed-sized clips ran at 0.55-0.7x the main thread's speed.
    One arena (``arenas=1``) puts every thread on the main heap. Call this before other
    threads start. Returns False where glibc is absent.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        bool(mallopt(option, value))
        for option, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, trim_threshold),
            (_M_ARENA_MAX, arenas),
        )
    )
    log.debug("glibc mallopt mmap=%d trim=%d arenas=%d: %s", mmap_threshold, trim_threshold, arenas, ok)
    return ok


def release_free_memory() -> bool:
    """Give freed heap memory back to the system (glibc ``malloc_trim``), e.g. after warm-up's large batches."""
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeriodicRelease:
    """``release_free_memory`` at most once per ``interval_s``, from whichever thread calls ``tick``.

    With the thresholds ``tune_malloc`` sets, freed memory stays in the heap for reuse, but
    under sustained load the heap fragments: a long-lived smaller block (a decoded clip
    waiting in the queue) is carved out of a freed activation block, the next activation
    of that size no longer fits, and the heap grows by it while the pages it left stay
    resident. Trimming now and then hands the free pages back (RSS follows what is in
    use); the next passes fault in what they touch again, once per interval.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def tick(self) -> bool:
        """Trim if the interval has passed since the last trim (or since start); True if it did."""
        if self.interval_s <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval_s:
                return False
            self._last = now
            self.trims += 1
        return release_free_memory()
