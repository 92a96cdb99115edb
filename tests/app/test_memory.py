"""Handing free heap memory back now and then (MEMORY_TRIM_S): the throttle, and a real server doing it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from models.system import PeriodicRelease
from tests.app.conftest import encode, live_server, metric_value, multipart_frames, synth_clip


def test_periodic_release_trims_at_most_once_per_interval() -> None:
    release = PeriodicRelease(0.2)
    assert not release.tick()  # the interval counts from the start
    time.sleep(0.25)
    release.tick()  # True where glibc is present; the count moves either way
    assert release.trims == 1
    assert not release.tick() and release.trims == 1
    time.sleep(0.25)
    release.tick()
    assert release.trims == 2
    off = PeriodicRelease(0)
    time.sleep(0.01)
    assert not off.tick() and off.trims == 0


def test_the_server_hands_memory_back_while_serving_and_not_when_off(default_ckpt: Path) -> None:
    files = multipart_frames([encode(f) for f in synth_clip("left", frames=4)])
    for interval, expect_trims in ((0.1, True), (0.0, False)):
        with live_server(checkpoint=default_ckpt, max_batch_size=4, memory_trim_s=interval) as url:
            for _ in range(4):
                assert httpx.post(f"{url}/predict", files=files, timeout=30).status_code == 200
                time.sleep(0.15)
            trims = metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_memory_trims")
            assert (trims >= 3) if expect_trims else (trims == 0), (interval, trims)
