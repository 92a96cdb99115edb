"""/predict through a real uvicorn server: JPEG, PNG, base64 JSON, MP4, models listing, batching."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.clips import check_answer, images_clip, reference, video_clip
from tests.support.media import encode, multipart_frames, synth_clip, write_mp4
from tests.support.servers import SERVER_KINDS, live_server, metric_value, server_of


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(default_ckpt: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    with server_of(request.param, checkpoint=default_ckpt, max_batch_size=32) as url:
        yield url


@pytest.fixture(scope="module")
def ref(default_ckpt: Path):  # type: ignore[no-untyped-def]
    """In-process reference: the same decoding and model, one clip at a time."""
    return reference(default_ckpt)


def test_jpeg_frames_are_classified(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    clip = synth_clip("left", frames=12, seed=1)
    blobs = [encode(f, "JPEG", quality=95) for f in clip]
    r = httpx.post(f"{server}/predict", files=multipart_frames(blobs), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "moving-digits-lstm" and body["model_version"] == ckpt.version
    check_answer(body, probs_of(images_clip(blobs, target)), ckpt.labels, 12)
    assert body["label"] == "left"  # the bundled model gets this clear clip right


def test_png_frames_of_other_sizes_are_resized(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    clip = synth_clip("zoom_in", frames=10, seed=2, size=64)  # 64x64, the model takes 32x32
    blobs = [encode(f, "PNG") for f in clip]
    blobs[3] = encode(np.ascontiguousarray(clip[3][:48, :40]), "PNG")  # mixed sizes are resized, not rejected
    r = httpx.post(f"{server}/predict?top_k=3", files=multipart_frames(blobs, "png"), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["top_k"]) == 3 and body["frames"] == 10
    expected = probs_of(images_clip(blobs, target))
    np.testing.assert_allclose([body["probabilities"][k] for k in ckpt.labels], expected, atol=1e-5)
    assert body["top_k"][0]["label"] == ckpt.labels[int(expected.argmax())]


def test_base64_json_frames(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    clip = synth_clip("up", frames=9, seed=3)
    blobs = [encode(f, "JPEG") for f in clip]
    payload = {"frames": [base64.b64encode(b).decode() for b in blobs]}
    r = httpx.post(f"{server}/models/moving-digits-lstm/predict", json=payload, timeout=30)
    assert r.status_code == 200, r.text
    check_answer(r.json(), probs_of(images_clip(blobs, target)), ckpt.labels, 9)
    # an optional field written as null is absent: the frames are served, not an empty "video"
    r = httpx.post(f"{server}/predict", json={**payload, "video": None}, timeout=30)
    assert r.status_code == 200, r.text
    check_answer(r.json(), probs_of(images_clip(blobs, target)), ckpt.labels, 9)


def test_mp4_video_is_sampled_to_the_model_frame_count(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    video = write_mp4(synth_clip("clockwise", frames=24, seed=4, size=64))
    r = httpx.post(f"{server}/predict", files={"video": ("clip.mp4", video, "video/mp4")}, timeout=30)
    assert r.status_code == 200, r.text
    check_answer(r.json(), probs_of(video_clip(video, target)), ckpt.labels, target.clip_frames)
    r = httpx.post(f"{server}/predict?frames=6", files={"video": ("clip.mp4", video, "video/mp4")}, timeout=30)
    assert r.status_code == 200 and r.json()["frames"] == 6


def test_requests_take_no_round_trip_through_the_worker_thread_pool(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dependencies and routes are coroutines: FastAPI runs a plain ``def`` one in anyio's thread
    pool, a hop between threads on every request (about 0.5 ms each at concurrency 1)."""
    import anyio.to_thread

    real = anyio.to_thread.run_sync
    hops: list[str] = []

    async def counted(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    blobs = [encode(f, "JPEG") for f in synth_clip("left", frames=4)]
    r = httpx.post(f"{server}/predict", files=multipart_frames(blobs), timeout=30)
    assert r.status_code == 200, r.text
    for path in ("/models", "/models/moving-digits-lstm", "/v2/models/moving-digits-lstm", "/v2/health/ready"):
        assert httpx.get(f"{server}{path}").status_code == 200
    assert hops == []


def test_models_listing_and_detail(server: str) -> None:
    r = httpx.get(f"{server}/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "moving-digits-lstm"
    [info] = body["models"]
    assert info["labels"][:2] == ["left", "right"] and info["input"]["height"] == 32
    assert info["metrics"]["test"]["accuracy"] >= 0.97
    assert info["batching"]["max_batch_size"] == 32
    assert httpx.get(f"{server}/models/moving-digits-lstm").json() == info
    r = httpx.get(f"{server}/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_concurrent_mixed_length_requests_are_batched_and_each_correct(server: str, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    labels = ckpt.labels
    jobs = [(labels[i % 8], 6 + (i * 5) % 11, 100 + i) for i in range(24)]
    payloads = [[encode(f) for f in synth_clip(lab, frames=n, seed=s)] for lab, n, s in jobs]
    before = httpx.get(f"{server}/metrics").text

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{server}/predict", files=multipart_frames(p)) for p in payloads)
            )

    responses = asyncio.run(fire())
    for r, blobs, (_, n, _) in zip(responses, payloads, jobs, strict=True):
        assert r.status_code == 200, r.text
        check_answer(r.json(), probs_of(images_clip(blobs, target)), labels, n)
    after = httpx.get(f"{server}/metrics").text
    batches = metric_value(after, "fusionserve_batch_size_count", model="moving-digits-lstm") - metric_value(
        before, "fusionserve_batch_size_count", model="moving-digits-lstm"
    )
    clips = metric_value(after, "fusionserve_batch_size_sum", model="moving-digits-lstm") - metric_value(
        before, "fusionserve_batch_size_sum", model="moving-digits-lstm"
    )
    assert clips == 24
    assert batches < 24, "24 concurrent requests should share batches"
    assert metric_value(after, "fusionserve_requests_total", route="/predict", status="200") >= 24


def test_serving_a_folder_of_checkpoints(two_model_dir: Path) -> None:
    with live_server(checkpoint=two_model_dir, default_model="tiny") as url:
        body = httpx.get(f"{url}/models").json()
        assert body["default"] == "tiny"
        assert sorted(m["name"] for m in body["models"]) == ["moving-digits-lstm", "tiny"]
        blobs = [encode(f) for f in synth_clip("left", frames=5)]
        r = httpx.post(f"{url}/predict", files=multipart_frames(blobs), timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["model_version"] == "7"
        assert set(r.json()["probabilities"]) == {"a", "b", "c"}
        r = httpx.post(f"{url}/models/moving-digits-lstm/predict", files=multipart_frames(blobs), timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "moving-digits-lstm"


def test_openapi_describes_every_route(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/predict",
        "/models/{name}/predict",
        "/models",
        "/models/{name}",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/metrics",
    ):
        assert path in paths, path
    body = paths["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert "examples" in str(spec["components"]["schemas"]["Prediction"]) or "example" in str(spec)


def test_two_instances_answer_concurrent_requests_each_correctly(default_ckpt: Path, ref) -> None:  # type: ignore[no-untyped-def]
    ckpt, target, probs_of = ref.ckpt, ref.target, ref.probs
    labels = ckpt.labels
    payloads = [[encode(f) for f in synth_clip(labels[i % 8], frames=16, seed=200 + i)] for i in range(12)]
    with live_server(checkpoint=default_ckpt, instances=2, max_batch_size=2) as url:
        assert httpx.get(f"{url}/models/{ckpt.name}").json()["batching"]["instances"] == 2

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                posts = (client.post(f"{url}/predict", files=multipart_frames(p)) for p in payloads)
                return await asyncio.gather(*posts)

        responses = asyncio.run(fire())
        clips = metric_value(httpx.get(f"{url}/metrics").text, "fusionserve_batch_size_sum", model=ckpt.name)
    for r, blobs in zip(responses, payloads, strict=True):
        assert r.status_code == 200, r.text
        check_answer(r.json(), probs_of(images_clip(blobs, target)), labels, 16)
    assert clips == 12  # every clip went through a batch once (warm-up and autotune bypass the batcher)
