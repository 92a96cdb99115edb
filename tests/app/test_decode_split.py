"""A large clip's frames decoded in two halves on two decode threads at once (app.decode)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

import app.decode as decode
from app.decode import InputLimits, image_frames, share_frames_with, stop_sharing
from app.errors import ApiError
from tests.app.conftest import encode, live_server, multipart_frames
from tests.app.test_decode import picture

LIMITS = InputLimits(64, 64, 3, 16, 16, 4096 * 4096)


@pytest.fixture
def frames_224() -> list[bytes]:
    return [encode(picture(224, 224, seed=i), quality=90) for i in range(16)]


@pytest.fixture
def helper() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="helper")
    yield pool
    stop_sharing(pool)
    pool.shutdown(wait=True)


def record_threads(monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """Which thread decoded each frame."""
    seen: dict[int, str] = {}
    real = decode.decode_image

    def recorded(data: bytes, limits: InputLimits, index: int) -> np.ndarray:
        seen[index] = threading.current_thread().name
        return real(data, limits, index)

    monkeypatch.setattr(decode, "decode_image", recorded)
    return seen


def test_a_large_clip_offers_its_second_half_to_a_free_decode_thread(
    frames_224: list[bytes], helper: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = image_frames(frames_224, LIMITS)
    seen = record_threads(monkeypatch)
    share_frames_with(helper, 64 * 1024)
    shared = image_frames(frames_224, LIMITS)
    np.testing.assert_array_equal(shared, alone)  # the same pixels, in order
    here = threading.current_thread().name
    assert [seen[i] for i in range(8)] == [here] * 8
    assert [seen[i] for i in range(8, 16)] == ["helper_0"] * 8
    # a clip under the threshold stays on its thread
    seen.clear()
    share_frames_with(helper, sum(map(len, frames_224)) + 1)
    image_frames(frames_224, LIMITS)
    assert set(seen.values()) == {here}


def test_a_half_no_thread_has_started_is_taken_back_so_nothing_waits_on_a_busy_pool(
    frames_224: list[bytes], helper: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    helper.submit(release.wait, 10)  # the only helper is busy with another clip
    seen = record_threads(monkeypatch)
    share_frames_with(helper, 1)
    try:
        shared = image_frames(frames_224, LIMITS)
    finally:
        release.set()
    assert set(seen.values()) == {threading.current_thread().name}
    np.testing.assert_array_equal(shared, np.stack([decode.decode_image(b, LIMITS, 0) for b in frames_224]))


@pytest.mark.parametrize("bad", [3, 12])
def test_a_bad_frame_in_either_half_is_reported_by_its_own_index(
    frames_224: list[bytes], helper: ThreadPoolExecutor, bad: int
) -> None:
    share_frames_with(helper, 1)
    blobs = list(frames_224)
    blobs[bad] = b"not an image at all"
    with pytest.raises(ApiError) as err:
        image_frames(blobs, LIMITS)
    assert err.value.status == 400 and f"frame {bad}" in err.value.message


def test_a_shut_down_pool_decodes_on_the_calling_thread(frames_224: list[bytes]) -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    share_frames_with(pool, 1)
    try:
        assert image_frames(frames_224, LIMITS).shape == (16, 64, 64, 3)
    finally:
        stop_sharing(pool)
    assert decode._helpers is None


def test_the_server_answers_a_224_clip_the_same_split_or_not(default_ckpt: Path, frames_224: list[bytes]) -> None:
    answers = []
    for split_kb in (16.0, 0.0):  # the clip is about 440 KB: split, then on one thread
        with live_server(checkpoint=default_ckpt, decode_split_kb=split_kb) as url:
            r = httpx.post(f"{url}/predict", files=multipart_frames(frames_224), params={"top_k": 8}, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["probabilities"])
    assert answers[0] == answers[1]
