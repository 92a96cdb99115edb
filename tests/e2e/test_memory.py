"""The heap through a real server: free memory handed back while serving and once idle (MEMORY_TRIM_S),
and what the heap holds, in use against free, on /metrics, under glibc and a preloaded jemalloc."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from host.malloc import heap_usage
from tests.host.test_malloc import JEMALLOC
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server, metric_value, spawn_server
from tests.support.waiting import wait_for


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


@pytest.mark.skipif(JEMALLOC is None, reason="needs jemalloc (Debian package libjemalloc2; .ci/run installs it)")
def test_under_a_preloaded_jemalloc_the_heap_gauges_and_trims_use_its_counts(default_ckpt: Path) -> None:
    env = {"LD_PRELOAD": str(JEMALLOC), "MALLOC_CONF": "dirty_decay_ms:-1"}
    files = multipart_frames([encode(f) for f in synth_clip("left", frames=4)])
    with spawn_server("--checkpoint", str(default_ckpt), "--memory-trim-s", "0.1", env=env) as (_, url):
        for _ in range(3):
            assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
            time.sleep(0.15)
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "fusionserve_heap_bytes", state="in_use") > 20e6  # torch and the model, at least
        assert metric_value(text, "fusionserve_memory_trims") >= 2
