"""A server on CUDA answers as the CPU model does (bf16, CUDA graphs, autotuned limits). Skipped where
no GPU is present."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.clips import images_clip, reference
from tests.support.media import encode, multipart_frames, synth_clip
from tests.support.servers import live_server

LABELS_OF_CLIPS = ["left", "right", "up", "down"]


@pytest.mark.gpu
def test_server_on_cuda_answers_like_the_cpu_model(default_ckpt: Path) -> None:
    ref = reference(default_ckpt)
    ckpt = ref.ckpt
    clips = [synth_clip(label, frames=16, seed=i) for i, label in enumerate(LABELS_OF_CLIPS * 4)]
    bodies = [[encode(f, "PNG") for f in clip] for clip in clips]
    with live_server(checkpoint=default_ckpt, device="cuda") as url:
        info = httpx.get(f"{url}/models/{ckpt.name}", timeout=30).json()
        assert info["device"] == "cuda" and info["precision"] == "bf16" and info["cuda_graphs"] is True
        assert info["batching"]["autotuned"] is True

        async def post_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(
                    *(client.post("/predict", files=multipart_frames(b, "png")) for b in bodies)
                )

        responses = asyncio.run(post_all())
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = ref.probs(images_clip(body, ref.target))
        got = np.array([response.json()["probabilities"][label] for label in ckpt.labels])
        np.testing.assert_allclose(got, expected, atol=3e-2)
        assert response.json()["label"] == ckpt.labels[int(expected.argmax())]
    assert sum(r.json()["label"] == c for r, c in zip(responses, LABELS_OF_CLIPS * 4, strict=True)) >= 14
