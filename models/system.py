"""Process-level tuning shared by training and serving."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import threading
import time
from typing import Any

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
    threads start. Returns False where glibc is absent, or where another allocator (jemalloc,
    preloaded) serves ``malloc`` and glibc's settings would change nothing.
    """
    if not sys.platform.startswith("linux") or allocator() == "jemalloc":
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
    """Give freed heap memory back to the system, e.g. after warm-up's large batches: glibc's
    ``malloc_trim``, or under jemalloc (preloaded) a purge of every arena's unused pages."""
    if allocator() == "jemalloc":
        return _mallctl_write(f"arena.{_JEMALLOC_ALL_ARENAS}.purge")
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False


_JEMALLOC_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL: "arena.<i>.*" applied to every arena


@functools.cache
def allocator() -> str:
    """The allocator behind ``malloc`` in this process: "jemalloc" (preloaded, ``LD_PRELOAD``),
    "glibc" (2.33+, which ``mallinfo2`` needs), or "other"."""
    if _mallctl() is not None:
        return "jemalloc"
    return "glibc" if _mallinfo2() is not None else "other"


@functools.cache
def _mallctl() -> Any:
    try:
        fn = ctypes.CDLL(None).mallctl
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t]
    return fn


def _mallctl_write(name: str, value: ctypes._SimpleCData | None = None) -> bool:
    fn = _mallctl()
    if fn is None:
        return False
    new, size = (None, 0) if value is None else (ctypes.byref(value), ctypes.sizeof(value))
    return fn(name.encode(), None, None, new, size) == 0


def _jemalloc_stats() -> tuple[int, int, int] | None:
    """(resident, allocated, resident - allocated) bytes after refreshing jemalloc's counters."""
    fn = _mallctl()
    if fn is None or not _mallctl_write("epoch", ctypes.c_uint64(1)):
        return None
    values = []
    for name in (b"stats.resident", b"stats.allocated"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if fn(name, ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None
        values.append(int(value.value))
    resident, allocated = values
    return resident, allocated, max(0, resident - allocated)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def heap_part(index: int) -> float:
    """``heap_usage()[index]`` (0: in use, 1: free), 0 where the allocator cannot tell: for a gauge's callback."""
    usage = heap_usage()
    return float(usage[index]) if usage is not None else 0.0


def heap_usage() -> tuple[int, int] | None:
    """(bytes in use, bytes free) of the heap, or None where the allocator cannot tell. Free bytes are
    heap that no block uses: held for reuse, resident until a trim (or purge) hands them back, and
    the measure of fragmentation under load."""
    stats = heap_stats()
    return None if stats is None else (stats[1], stats[2])


def heap_stats() -> tuple[int, int, int] | None:
    """(heap size, bytes in use, bytes free), as ``heap_usage``. glibc 2.33+: ``mallinfo2`` over every
    arena, not counting blocks mapped on their own; jemalloc: its resident bytes (metadata included)
    and allocated bytes. None with another allocator."""
    if allocator() == "jemalloc":
        return _jemalloc_stats()
    info = _mallinfo2()
    if info is None:
        return None
    m = info()
    return int(m.arena), int(m.uordblks), int(m.fordblks)


@functools.cache
def _mallinfo2() -> Any:
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return None
    try:
        info = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    return info


class HeapRelease:
    """``release_free_memory`` at most once per ``interval_s`` under load, and once more when the work pauses.

    With the thresholds ``tune_malloc`` sets, freed memory stays in the heap for reuse, but
    under sustained load the heap fragments: blocks that live longer (decoded clips waiting
    in the queue, request bodies, the library's own objects) split freed activation blocks,
    the next activation no longer fits, and the heap grows while the pages it left stay
    resident (``fusionserve_heap_bytes`` shows the free part). ``tick``, after each batch,
    trims if ``interval_s`` has passed since the last trim: RSS follows what is in use in a
    sawtooth, and the next passes fault in what they touch again, once per interval. A daemon
    thread (``start``/``close``) trims once more when no batch has run for ``interval_s``, so
    a server that went quiet holds only what is in use. ``trims`` counts both kinds.

    ``periodic=False`` keeps only the trim once idle: under jemalloc (preloaded, with its pages
    kept: ``MALLOC_CONF=dirty_decay_ms:-1``, as the container runs) the heap does not grow past
    its working set, and a trim under load would only make the next passes fault their memory in
    again. ``for_allocator`` picks it.
    """

    @classmethod
    def for_allocator(cls, interval_s: float) -> HeapRelease:
        return cls(interval_s, periodic=allocator() != "jemalloc")

    def __init__(self, interval_s: float, periodic: bool = True) -> None:
        self.interval_s = interval_s
        self.periodic = periodic
        self.trims = 0
        self._last_trim = self._last_batch = time.monotonic()
        self._pending = False  # a batch ran since the last trim
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """After a batch: trim if the interval has passed since the last trim (or since start); True if it did."""
        if self.interval_s <= 0:
            return False
        now = time.monotonic()
        with self._lock:
            self._last_batch = now
            if not self.periodic or now - self._last_trim < self.interval_s:
                self._pending = True
                return False
            self._trimmed(now)
        return release_free_memory()

    def _trimmed(self, now: float) -> None:  # under the lock
        self._last_trim = now
        self._pending = False
        self.trims += 1

    def start(self) -> None:
        """Serving starts: the intervals count from now (the caller has just trimmed after its warm-up)."""
        with self._lock:
            self._last_trim = self._last_batch = time.monotonic()
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch_idle, name="heap-release", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch_idle(self) -> None:
        while not self._stop.wait(min(1.0, self.interval_s / 4)):
            now = time.monotonic()
            with self._lock:
                if not (self._pending and now - self._last_batch >= self.interval_s):
                    continue
                self._trimmed(now)
            release_free_memory()
