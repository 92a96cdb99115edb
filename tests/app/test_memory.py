"""The heap on the CPU: free memory handed back now and then under load and once the server goes idle
(MEMORY_TRIM_S), and what the heap holds, in use against free, on /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from models.system import HeapRelease, heap_usage
from tests.app.conftest import encode, live_server, metric_value, multipart_frames, spawn_server, synth_clip


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


JEMALLOC = next(
    (
        p
        for p in ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
        if Path(p).exists()
    ),
    None,
)


@pytest.mark.skipif(JEMALLOC is None, reason="needs jemalloc (Debian package libjemalloc2; .ci/run installs it)")
def test_under_a_preloaded_jemalloc_the_heap_gauges_and_trims_use_its_counts(default_ckpt: Path) -> None:
    # glibc's mallinfo2 would read an empty heap there (jemalloc serves every malloc)
    env = {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:-1"}
    probe = "from models import system; print(system.allocator(), system.heap_stats(), system.release_free_memory())"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True)
    name, stats, released = out.stdout.split(" ", 1)[0], *out.stdout.rstrip().split(" ", 1)[1].rsplit(" ", 1)
    assert (name, released) == ("jemalloc", "True"), out
    heap, in_use, free = (int(x) for x in stats.strip("()").split(","))
    assert heap >= in_use > 1e6 and free == heap - in_use
    files = multipart_frames([encode(f) for f in synth_clip("left", frames=4)])
    with spawn_server("--checkpoint", str(default_ckpt), "--memory-trim-s", "0.1", env=env) as (_, url):
        for _ in range(3):
            assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
            time.sleep(0.15)
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "fusionserve_heap_bytes", state="in_use") > 20e6  # torch and the model, at least
        assert metric_value(text, "fusionserve_memory_trims") >= 2
