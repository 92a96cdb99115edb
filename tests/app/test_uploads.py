"""Uploads to clips (app.uploads): a large clip's frames decoded in two halves on two decode threads
at once, forms, base64 frames and videos."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import app.uploads as uploads
from app.uploads import FrameSplitter, Target, image_frames
from media import BadInput, FrameFormat, Limits
from tests.support.media import encode, picture

LIMITS = Target(FrameFormat(64, 64, 3), 16, Limits(16, 4096 * 4096))


@pytest.fixture
def frames_224() -> list[bytes]:
    return [encode(picture(224, 224, seed=i), quality=90) for i in range(16)]


@pytest.fixture
def helper() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="helper")
    yield pool
    pool.shutdown(wait=True)


def record_threads(monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """Which thread decoded each frame."""
    seen: dict[int, str] = {}
    real = uploads.decode_image

    def recorded(data: bytes, fmt: FrameFormat, max_pixels: int, index: int) -> np.ndarray:
        seen[index] = threading.current_thread().name
        return real(data, fmt, max_pixels, index)

    monkeypatch.setattr(uploads, "decode_image", recorded)
    return seen


def test_a_large_clip_offers_its_second_half_to_a_free_decode_thread(
    frames_224: list[bytes], helper: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = image_frames(frames_224, LIMITS)
    seen = record_threads(monkeypatch)
    shared = image_frames(frames_224, LIMITS, FrameSplitter(helper, 64 * 1024))
    np.testing.assert_array_equal(shared, alone)  # the same pixels, in order
    here = threading.current_thread().name
    assert [seen[i] for i in range(8)] == [here] * 8
    assert [seen[i] for i in range(8, 16)] == ["helper_0"] * 8
    # a clip under the threshold stays on its thread
    seen.clear()
    image_frames(frames_224, LIMITS, FrameSplitter(helper, sum(map(len, frames_224)) + 1))
    assert set(seen.values()) == {here}


def test_a_half_no_thread_has_started_is_taken_back_so_nothing_waits_on_a_busy_pool(
    frames_224: list[bytes], helper: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    helper.submit(release.wait, 10)  # the only helper is busy with another clip
    seen = record_threads(monkeypatch)
    try:
        shared = image_frames(frames_224, LIMITS, FrameSplitter(helper, 1))
    finally:
        release.set()
    assert set(seen.values()) == {threading.current_thread().name}
    np.testing.assert_array_equal(shared, image_frames(frames_224, LIMITS))


@pytest.mark.parametrize("bad", [3, 12])
def test_a_bad_frame_in_either_half_is_reported_by_its_own_index(
    frames_224: list[bytes], helper: ThreadPoolExecutor, bad: int
) -> None:
    blobs = list(frames_224)
    blobs[bad] = b"not an image at all"
    with pytest.raises(BadInput, match=f"frame {bad} "):
        image_frames(blobs, LIMITS, FrameSplitter(helper, 1))


def test_a_shut_down_pool_decodes_on_the_calling_thread(frames_224: list[bytes]) -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    assert image_frames(frames_224, LIMITS, FrameSplitter(pool, 1)).shape == (16, 64, 64, 3)
