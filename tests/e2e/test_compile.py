"""``FUSIONSERVE_COMPILE``: the CNN through torch.compile, answering as the eager model does."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import InputSpec, LSTMHeadConfig, ModelConfig, SmallCNNConfig, build_model, load_checkpoint, save_checkpoint
from tests.support.clips import images_clip, target_of
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight CNN+LSTM (16x16 frames), so that compiling it stays quick."""
    cfg = ModelConfig(4, SmallCNNConfig(widths=(4, 8)), LSTMHeadConfig(hidden=8), image_size=16)
    path = tmp_path_factory.mktemp("compile") / "small.safetensors"
    spec = InputSpec.for_model(cfg, frames=4, min_frames=1, max_frames=8)
    return save_checkpoint(path, build_model(cfg).eval(), name="small", labels=list("abcd"), input_spec=spec)


@pytest.mark.slow
def test_compiled_server_answers_like_the_eager_model(small_ckpt: Path) -> None:
    ckpt = load_checkpoint(small_ckpt)
    spec = ckpt.input
    target = target_of(spec, max_frames=8)
    with live_server(checkpoint=small_ckpt, compile=True, max_batch_size=4) as url:
        info = httpx.get(f"{url}/models/small", timeout=30).json()
        assert info["compiled"] is True
        for frames in (4, 3):  # the model's length, then another: dynamic shapes, no error
            blobs = [encode(f, "PNG") for f in synth_clip("left", frames=frames, seed=frames, size=16)]
            r = httpx.post(f"{url}/predict", files=multipart_frames(blobs, "png"), timeout=120)
            assert r.status_code == 200, r.text
            clip = images_clip(blobs, target)
            with torch.inference_mode():
                expected = ckpt.model(clip, torch.tensor([frames])).softmax(-1)[0].numpy()
            got = np.array([r.json()["probabilities"][label] for label in ckpt.labels])
            np.testing.assert_allclose(got, expected, atol=1e-5)
