"""The heap on the CPU: free memory handed back now and then under load and once the server goes idle
(MEMORY_TRIM_S), and what the heap holds, in use against free, on /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from models.system import HeapRelease, heap_usage
from tests.app.conftest import encode, live_server, metric_value, multipart_frames, synth_clip


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


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


def test_the_server_hands_memory_back_while_serving_and_once_idle(default_ckpt: Path) -> None:
    files = multipart_frames([encode(f) for f in synth_clip("left", frames=4)])
    with live_server(checkpoint=default_ckpt, max_batch_size=4, memory_trim_s=0.1) as url:
        for _ in range(4):
            assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
            time.sleep(0.15)
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "fusionserve_memory_trims") >= 3
        if heap_usage() is not None:  # glibc 2.33+: the heap in use (the model's weights at least) and free
            assert metric_value(text, "fusionserve_heap_bytes", state="in_use") > 1e6
            assert metric_value(text, "fusionserve_heap_bytes", state="free") > 0
    with live_server(checkpoint=default_ckpt, max_batch_size=4, memory_trim_s=2.0) as url:
        for _ in range(3):  # all within the first two seconds of serving: no periodic trim yet
            assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
        assert metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_memory_trims") == 0
        assert wait_for(lambda: metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_memory_trims") == 1)
    with live_server(checkpoint=default_ckpt, max_batch_size=4, memory_trim_s=0) as url:
        for _ in range(3):
            assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
            time.sleep(0.1)
        assert metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_memory_trims") == 0
