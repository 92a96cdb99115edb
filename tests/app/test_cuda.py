"""The CUDA path: pinned memory and non-blocking copies, bf16, CUDA graphs, two batches in flight.

Skipped where no GPU is present. Fp32 on the GPU is compared with looser tolerances than
CPU-to-CPU checks, because cuDNN's convolutions use TF32 by default; bf16 is compared on
clear clips, where the answer (top-1) must not change and probabilities stay within 0.03.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.decode import InputLimits
from app.preprocess import decode_images
from app.runtime import ModelRuntime, bucket
from models import load_checkpoint
from tests.app.conftest import encode, live_server, multipart_frames, synth_clip

LABELS_OF_CLIPS = ["left", "right", "up", "down"]


def real_clips(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving-digits clips of the given lengths as one ragged uint8 batch (N, C, H, W) with channels-last strides."""
    clips = [torch.from_numpy(synth_clip(LABELS_OF_CLIPS[i % 4], frames=n, seed=i)) for i, n in enumerate(lengths)]
    return torch.cat(clips).permute(0, 3, 1, 2), torch.tensor(lengths)


def runtimes(ckpt: Path, precision: str, graphs: bool) -> tuple[ModelRuntime, ModelRuntime]:
    cpu = ModelRuntime(load_checkpoint(ckpt), torch.device("cpu"))
    gpu = ModelRuntime(load_checkpoint(ckpt, device="cuda"), torch.device("cuda"), precision, graphs)
    gpu.warm_up(64)
    gpu.prepare(4)  # graphs for 1, 2 and 4 clips of the model's 16 frames, as the server does at start
    return cpu, gpu


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_runtime_matches_cpu(default_ckpt: Path, precision: str, graphs: bool) -> None:
    cpu, gpu = runtimes(default_ckpt, precision, graphs)
    assert gpu.precision == precision, "the GPU fell back to fp32"
    atol = 2e-3 if precision == "fp32" else 3e-2
    # ragged, a padded bucket (3 -> 4), one clip, a length without a graph (eager)
    for lengths in ([5, 16], [16, 16, 16], [16], [8, 8]):
        frames, lens = real_clips(lengths)
        expected, got = cpu.infer(frames, lens), gpu.infer(frames, lens)
        assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), (lengths, got, expected)
    assert gpu.cuda_graphs == graphs, "a graph capture failed (see the log)"
    assert set(gpu._graphs) == ({(1, 16), (2, 16), (bucket(3), 16)} if graphs else set())


@pytest.mark.gpu
def test_launched_batches_in_flight_give_each_its_own_answer(default_ckpt: Path) -> None:
    cpu, gpu = runtimes(default_ckpt, "bf16", True)
    batches = [real_clips(lengths) for lengths in ([16, 16], [16, 16, 16, 16], [7, 16], [16])]
    handles = [gpu.launch(frames, lens) for frames, lens in batches]  # all queued before any is waited for
    for (frames, lens), handle in zip(batches, handles, strict=True):
        got = handle.wait()
        torch.testing.assert_close(got, cpu.infer(frames, lens), atol=3e-2, rtol=0)


@pytest.mark.gpu
def test_server_on_cuda_answers_like_the_cpu_model(default_ckpt: Path) -> None:
    ckpt = load_checkpoint(default_ckpt)
    spec = ckpt.input
    limits = InputLimits(spec["height"], spec["width"], spec["channels"], spec["frames"], 64, 4096 * 4096)
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
        decoded = decode_images(body, limits)
        with torch.inference_mode():
            expected = ckpt.model(decoded, torch.tensor([decoded.shape[0]])).softmax(-1)[0].numpy()
        got = np.array([response.json()["probabilities"][label] for label in ckpt.labels])
        np.testing.assert_allclose(got, expected, atol=3e-2)
        assert response.json()["label"] == ckpt.labels[int(expected.argmax())]
    assert sum(r.json()["label"] == c for r, c in zip(responses, LABELS_OF_CLIPS * 4, strict=True)) >= 14
