"""``explain=frames`` through a real uvicorn server: the answer is /predict's, with each frame's importance
as the model itself gives it in process, and attention pooling weights where the head has them."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import torch

from models import default_checkpoint, load_checkpoint
from models.explain import occlusion
from tests.support.media import encode, multipart_frames, synth_clip, write_mp4
from tests.support.servers import SERVER_KINDS, server_of

MODELS = ("moving-digits-lstm", "moving-digits-attention")
KEY = "explain-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("explain-models")
    for name in MODELS:
        shutil.copy(default_checkpoint().parent / f"{name}.safetensors", folder)
    settings = {"checkpoint": folder, "default_model": MODELS[0], "max_batch_size": 4, "api_key": KEY}
    with server_of(request.param, **settings) as url:
        yield url


def png_frames(clip: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    return multipart_frames([encode(f, "PNG") for f in clip], "png")


@pytest.mark.parametrize("name", MODELS)
def test_explained_frames_give_predict_s_answer_and_the_in_process_importance(server: str, name: str) -> None:
    clip = synth_clip("up", frames=10, seed=3)  # PNG: lossless, so the server sees these exact pixels
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        plain = client.post(f"/models/{name}/predict", files=png_frames(clip)).json()
        r = client.post(f"/models/{name}/predict", params={"explain": "frames"}, files=png_frames(clip))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "frame_importance" not in plain and "attention" not in plain
    assert body["label"] == plain["label"] and body["frames"] == 10
    for label, p in plain["probabilities"].items():
        assert body["probabilities"][label] == pytest.approx(p, abs=1e-5)
    model = load_checkpoint(default_checkpoint().parent / f"{name}.safetensors").model.eval()
    expected = occlusion(model, torch.from_numpy(clip).permute(0, 3, 1, 2))
    assert body["frame_importance"] == pytest.approx(expected.importance.tolist(), abs=1e-4)
    if name.endswith("attention"):
        assert expected.attention is not None
        assert body["attention"] == pytest.approx(expected.attention.tolist(), abs=1e-4)
        assert sum(body["attention"]) == pytest.approx(1.0, abs=1e-4)
    else:
        assert "attention" not in body


def test_a_video_is_explained_per_sampled_frame(server: str) -> None:
    video = write_mp4(synth_clip("left", frames=40, seed=5, size=64), fps=20)
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        r = client.post(
            "/predict", params={"explain": "frames", "frames": 12}, files={"video": ("v.mp4", video, "video/mp4")}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODELS[0] and body["frames"] == 12 and len(body["frame_importance"]) == 12
    assert body["timing_ms"]["queue"] == 0.0 and body["timing_ms"]["inference"] > 0


def test_explain_takes_frames_only_and_keeps_the_key_and_the_limits(server: str) -> None:
    files = png_frames(synth_clip("down", frames=3, seed=1))
    with httpx.Client(base_url=server, timeout=60) as client:
        wrong = client.post("/predict", params={"explain": "pixels"}, files=files, headers=AUTH)
        unkeyed = client.post("/predict", params={"explain": "frames"}, files=files)
        corrupt = client.post(
            "/predict",
            params={"explain": "frames"},
            files={"frames": ("a.png", b"not a png", "image/png")},
            headers=AUTH,
        )
        alive = client.post("/predict", params={"explain": "frames"}, files=files, headers=AUTH)
    assert wrong.status_code == 422
    assert unkeyed.status_code == 401
    assert corrupt.status_code == 400 and corrupt.json()["error"]["code"]
    assert alive.status_code == 200 and len(alive.json()["frame_importance"]) == 3
