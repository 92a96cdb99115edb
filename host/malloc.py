"""The C heap of this process: glibc's malloc tuned for large tensors, and what the heap holds.

Training and serving both call ``tune_malloc`` first thing; the server also reads the heap
(``heap_usage``) for its gauges and hands free memory back (``release_free_memory``,
driven by ``app.memory.HeapRelease``). Under a preloaded jemalloc the same calls use its
``mallctl`` interface.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31, arenas: int = 1) -> bool:
    """Keep glibc from mapping and unmapping fresh pages for every large tensor.

    With glibc's defaults each pass allocates its activations with mmap and returns them with
    munmap, so every step page-faults its memory anew. Raised mmap and trim thresholds keep freed
    blocks in the heap for reuse, and one arena puts every thread on that heap (a thread's own
    arena holds at most 64 MiB, so a worker thread's large activations would be mapped afresh
    whatever the threshold). Call it before other threads start. False where glibc is absent or
    a preloaded jemalloc serves ``malloc`` (docs/performance.md: memory).
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
