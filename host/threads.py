"""Threads named for the operating system too, so ``top -H``, ``ps -L`` and ``/proc/PID/task/*/comm``
say which thread does what (Python names its threads for itself only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

PR_SET_NAME = 15  # prctl(2): name the calling thread, at most 15 bytes

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:  # no C library to load (not Linux): the threads keep the process's name
    _libc = None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name), cut to 15 bytes, where the system allows."""
    if _libc is None or not hasattr(_libc, "prctl"):
        return
    text = (name or threading.current_thread().name).encode()[:15]
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
