"""Free heap memory handed back now and then under load and once the work pauses (app.memory,
MEMORY_TRIM_S). tests/e2e/test_memory.py checks the same through a server's /metrics."""

from __future__ import annotations

import time

from app.memory import HeapRelease
from tests.support.waiting import wait_for


def test_heap_release_trims_at_most_once_per_interval_after_batches() -> None:
    release = HeapRelease(0.2)
    assert not release.tick()  # the interval counts from the start
    time.sleep(0.25)
    release.tick()  # True where glibc is present; the count moves either way
    assert release.trims == 1
    assert not release.tick() and release.trims == 1
    time.sleep(0.25)
    release.tick()
    assert release.trims == 2
    off = HeapRelease(0)
    time.sleep(0.01)
    assert not off.tick() and off.trims == 0


def test_heap_release_trims_once_when_the_batches_stop() -> None:
    release = HeapRelease(0.3)
    release.start()
    try:
        time.sleep(0.5)
        assert release.trims == 0  # no batch ran: nothing to hand back
        release.tick()  # the interval since start has passed: the periodic trim
        assert release.trims == 1
        release.tick()  # right after it: no trim now, one pending
        assert release.trims == 1
        assert wait_for(lambda: release.trims == 2)  # 0.3 s without a batch
        time.sleep(0.6)
        assert release.trims == 2  # once per pause, not once per interval
        for _ in range(8):  # batches every 0.1 s: the periodic trim, none for idleness
            release.tick()
            time.sleep(0.1)
        release.tick()  # within the interval of the loop's last trim: one pending
        busy = release.trims
        assert 1 <= busy - 2 <= 3
        assert wait_for(lambda: release.trims == busy + 1)
    finally:
        release.close()
    off = HeapRelease(0)
    off.start()
    off.tick()
    time.sleep(0.1)
    assert off.trims == 0
    off.close()


def test_without_periodic_trims_only_a_pause_hands_memory_back() -> None:
    release = HeapRelease(0.2, periodic=False)  # what jemalloc gets: its heap does not outgrow the working set
    release.start()
    try:
        for _ in range(6):  # batches every 0.1 s for 0.6 s: three intervals, no trim under load
            release.tick()
            time.sleep(0.1)
        assert release.trims == 0
        assert wait_for(lambda: release.trims == 1)  # 0.2 s without a batch
    finally:
        release.close()
