"""Process-level tuning shared by training and serving."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep glibc from mapping and unmapping fresh pages for every large tensor.

    With glibc's defaults, each forward/backward pass allocates its activations with
    mmap and returns them with munmap, so every step page-faults its memory anew
    (visible as high system CPU time). Raising the mmap and trim thresholds keeps
    freed blocks in the heap for reuse. Returns False where glibc is absent.
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
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("glibc mallopt mmap_threshold=%d trim_threshold=%d: %s", mmap_threshold, trim_threshold, ok)
    return ok
