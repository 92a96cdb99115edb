"""/timeline through a real uvicorn server: each window equals /predict on its frames, a real MP4's
windows and times, and the limits (MAX_TIMELINE_FRAMES, MAX_VIDEO_MB, the query, a corrupt video)."""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from models import default_checkpoint
from tests.support.media import encode, multipart_frames, synth_clip, write_mp4
from tests.support.servers import SERVER_KINDS, live_server, server_of

MODELS = ("moving-digits-lstm", "moving-digits-attention")
MOTIONS = ("left", "up", "right", "down")  # 4 x 60 frames: 240 frames, 10 s at 24 fps
KEY = "timeline-key"


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Both bundled models; at most 100 sampled frames a timeline."""
    folder = tmp_path_factory.mktemp("timeline-models")
    bundled = default_checkpoint().parent
    for name in MODELS:
        shutil.copy(bundled / f"{name}.safetensors", folder)
    settings = {"checkpoint": folder, "default_model": MODELS[0], "max_batch_size": 8, "max_timeline_frames": 100}
    with server_of(request.param, **settings) as url:
        yield url


@pytest.fixture(scope="module")
def ten_seconds() -> bytes:
    """An MP4 of 10 s at 24 fps, 64x64 (a keyframe every 250 frames: libx264's default)."""
    clip = np.concatenate([synth_clip(label, frames=60, seed=i, size=64) for i, label in enumerate(MOTIONS)])
    return write_mp4(clip, fps=24)


def raw_h264(frames: np.ndarray, fps: int = 24) -> bytes:
    """An H.264 elementary stream: no container, so no duration and no timestamps before decoding."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def probabilities(body: dict, labels: list[str]) -> np.ndarray:  # type: ignore[type-arg]
    return np.array([body["probabilities"][label] for label in labels])


@pytest.mark.parametrize("model", MODELS)
def test_each_window_equals_predict_on_its_frames(server: str, model: str) -> None:
    labels = httpx.get(f"{server}/models/{model}").json()["labels"]
    clip = np.concatenate([synth_clip("left", frames=14, seed=3), synth_clip("clockwise", frames=14, seed=4)])
    blobs = [encode(f, "PNG") for f in clip]  # lossless: the pixels /predict gets are the same
    r = httpx.post(f"{server}/models/{model}/timeline?fps=4", files=multipart_frames(blobs, "png"), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["fps"], body["frames"], body["duration_s"]) == (model, 4.0, 28, 7.0)
    # window 16 (the models' clip length), stride 8: windows at 0 and 8, then one ending at the last frame
    starts = [0, 8, 12]
    assert [(s["start_s"], s["end_s"]) for s in body["segments"]] == [(s / 4, (s + 16) / 4) for s in starts]
    for start, segment in zip(starts, body["segments"], strict=True):
        files = multipart_frames(blobs[start : start + 16], "png")
        expected = httpx.post(f"{server}/models/{model}/predict", files=files, timeout=30).json()
        np.testing.assert_allclose(probabilities(segment, labels), probabilities(expected, labels), atol=1e-4)
        assert segment["label"] == expected["label"]


def test_window_and_stride_from_the_query(server: str) -> None:
    clip = synth_clip("up", frames=11, seed=5)
    blobs = [encode(f, "PNG") for f in clip]
    r = httpx.post(f"{server}/timeline?fps=2&window=4&stride=3", files=multipart_frames(blobs, "png"), timeout=30)
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]
    assert [(s["start_s"], s["end_s"]) for s in segments] == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0), (3.5, 5.5)]
    expected = httpx.post(f"{server}/predict", files=multipart_frames(blobs[3:7], "png"), timeout=30).json()
    np.testing.assert_allclose(
        list(segments[1]["probabilities"].values()), list(expected["probabilities"].values()), atol=1e-4
    )
    # fewer frames than a window: one segment over all of them
    r = httpx.post(f"{server}/timeline?fps=10", files=multipart_frames(blobs[:5], "png"), timeout=30)
    assert [(s["start_s"], s["end_s"]) for s in r.json()["segments"]] == [(0.0, 0.5)]


def test_an_mp4_is_sampled_at_fps_over_its_duration(server: str, ten_seconds: bytes) -> None:
    r = httpx.post(f"{server}/timeline", files={"video": ("v.mp4", ten_seconds, "video/mp4")}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fps"] == 8.0 and body["duration_s"] == pytest.approx(10.0, abs=0.05)
    assert abs(body["frames"] - round(body["duration_s"] * 8)) <= 1
    # 80 frames, windows of 16 every 8: 0, 8, ..., 64 (the last ends at the last frame)
    segments = body["segments"]
    assert len(segments) == (body["frames"] - 16) // 8 + 1 + ((body["frames"] - 16) % 8 > 0)
    assert [s["start_s"] for s in segments[:3]] == [0.0, 1.0, 2.0]
    assert all(s["end_s"] == pytest.approx(min(s["start_s"] + 2.0, body["duration_s"])) for s in segments)
    assert segments[-1]["end_s"] == pytest.approx(body["duration_s"], abs=0.13)
    for s in segments:
        assert sum(s["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert s["label"] == max(s["probabilities"], key=s["probabilities"].get)
    # the same video as JSON base64, and at another rate
    r = httpx.post(f"{server}/timeline?fps=4", json={"video": base64.b64encode(ten_seconds).decode()}, timeout=30)
    assert r.status_code == 200, r.text
    assert abs(r.json()["frames"] - 40) <= 1


def test_sampled_frames_past_max_timeline_frames_get_413(server: str, ten_seconds: bytes) -> None:
    # 10 s at 12 fps is 120 frames, over the server's 100: refused from the header's duration
    r = httpx.post(f"{server}/timeline?fps=12", files={"video": ("v.mp4", ten_seconds, "video/mp4")}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert "10 s of video at 12 frames per second is more than the limit of 100" in r.json()["error"]["message"]
    # a raw H.264 stream has no duration: refused once decoding samples the 101st frame
    raw = raw_h264(synth_clip("left", frames=120, seed=1, size=32), fps=24)
    r = httpx.post(f"{server}/timeline?fps=24", files={"video": ("v.h264", raw, "video/h264")}, timeout=30)
    assert r.status_code == 413, r.text
    assert "the video at 24 frames per second is more than the limit of 100" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/timeline?fps=12", files={"video": ("v.h264", raw, "video/h264")}, timeout=30)
    assert r.status_code == 200 and r.json()["frames"] == 60, r.text


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("fps=0", "invalid_request"),
        ("fps=-1", "invalid_request"),
        ("fps=abc", "invalid_request"),
        ("fps=inf", "invalid_request"),
        ("fps=0.0001", "invalid_request"),
        ("fps=1001", "invalid_request"),
        ("window=0", "invalid_request"),
        ("stride=0", "invalid_request"),
        ("window=x", "invalid_request"),
        ("window=65", "wrong_shape"),  # more than MAX_FRAMES (64)
    ],
)
def test_bad_query_values_get_422(server: str, query: str, code: str) -> None:
    blobs = [encode(f, "PNG") for f in synth_clip("up", frames=2)]
    r = httpx.post(f"{server}/timeline?{query}", files=multipart_frames(blobs, "png"), timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_a_corrupt_video_gets_400_and_an_unknown_model_404(server: str, ten_seconds: bytes) -> None:
    corrupt = ten_seconds[:48] + b"\x01" * 3000
    r = httpx.post(f"{server}/timeline", files={"video": ("v.mp4", corrupt, "video/mp4")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input", r.text
    r = httpx.post(f"{server}/models/nope/timeline", files={"video": ("v.mp4", ten_seconds, "video/mp4")})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def test_timelines_take_max_video_mb_and_predict_keeps_max_upload_mb(default_ckpt: Path, ten_seconds: bytes) -> None:
    size = len(ten_seconds)
    limits = {"max_upload_mb": size / 2 / 2**20, "max_video_mb": 2 * size / 2**20}
    with live_server(checkpoint=default_ckpt, max_batch_size=4, api_key=KEY, **limits) as url:
        auth = {"X-API-Key": KEY}
        video = {"video": ("v.mp4", ten_seconds, "video/mp4")}
        r = httpx.post(f"{url}/timeline", files=video, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/predict", files=video, headers=auth, timeout=30)
        assert r.status_code == 413, r.text
        big = {"video": ("v.mp4", b"\0" * (2 * size + 1), "video/mp4")}
        r = httpx.post(f"{url}/models/moving-digits-lstm/timeline", files=big, headers=auth, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
        r = httpx.post(f"{url}/timeline", files=video, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_a_timeline_past_decode_timeout_gets_504_and_the_server_goes_on(default_ckpt: Path, ten_seconds: bytes) -> None:
    with live_server(checkpoint=default_ckpt, max_batch_size=4, decode_timeout_s=0.02) as url:
        video = {"video": ("v.mp4", ten_seconds, "video/mp4")}
        r = httpx.post(f"{url}/timeline?fps=24", files=video, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        # the abandoned timeline stops at its next frame; a short one then gets through
        files = multipart_frames([encode(f, "PNG") for f in synth_clip("up", frames=2)], "png")
        until = time.monotonic() + 30
        while (r := httpx.post(f"{url}/timeline", files=files, timeout=30)).status_code != 200:
            assert r.status_code == 504 and time.monotonic() < until, r.text
        assert r.json()["frames"] == 2
