"""Free heap memory handed back to the system while the server runs (``MEMORY_TRIM_S``)."""

from __future__ import annotations

import threading
import time

from host.malloc import allocator, release_free_memory


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
