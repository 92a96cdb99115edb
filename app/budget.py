"""One memory budget for the whole server: the bytes of request bodies in flight (read or being
read, waiting to be decoded, queued) are reserved against it, so that many large requests at once
are refused (503 with Retry-After) before their bodies are read, instead of taking the memory."""

from __future__ import annotations

import threading
from pathlib import Path


class MemoryBudget:
    """Bytes reserved by requests in flight, at most ``total`` (``MAX_INFLIGHT_MB``)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes of the budget; False (nothing taken) when they do not fit."""
        with self._lock:
            if self.used + size > self.total:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size

    @property
    def nearly_spent(self) -> bool:
        """Nine tenths or more of the budget reserved: a large request would be refused."""
        return self.used >= 0.9 * self.total


def memory_limit() -> int:
    """The bytes this process may use: its cgroup's limit where one is set, else the machine's memory."""
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.is_file():
        text = cgroup.read_text().strip()
        if text.isdigit():
            return int(text)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 8 << 30
