"""The CUDA path: pinned memory and non-blocking copies, bf16, CUDA graphs, two batches in flight.

Skipped where no GPU is present. Fp32 on the GPU is compared with looser tolerances than
CPU-to-CPU checks, because cuDNN's convolutions use TF32 by default; bf16 is compared on
clear clips, where the answer (top-1) must not change and probabilities stay within 0.03.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cuda import bucket
from app.runtime import ModelRuntime
from models import load_checkpoint
from tests.support.media import synth_clip

LABELS_OF_CLIPS = ["left", "right", "up", "down"]


def real_clips(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving-digits clips of the given lengths as one ragged uint8 batch (N, C, H, W) with channels-last strides."""
    clips = [torch.from_numpy(synth_clip(LABELS_OF_CLIPS[i % 4], frames=n, seed=i)) for i, n in enumerate(lengths)]
    return torch.cat(clips).permute(0, 3, 1, 2), torch.tensor(lengths)


def runtimes(ckpt: Path, precision: str, graphs: bool) -> tuple[ModelRuntime, ModelRuntime]:
    cpu = ModelRuntime(load_checkpoint(ckpt), torch.device("cpu"))
    gpu = ModelRuntime(
        load_checkpoint(ckpt, device="cuda"), torch.device("cuda"), precision=precision, cuda_graphs=graphs
    )
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
        expected, got = cpu.run(frames, lens).result(), gpu.run(frames, lens).result()
        assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), (lengths, got, expected)
    assert gpu.cuda_graphs == graphs, "a graph capture failed (see the log)"
    assert gpu._cuda is not None and gpu._cuda.graph_buckets == ([1, 2, bucket(3)] if graphs else [])


@pytest.mark.gpu
def test_batches_in_flight_give_each_its_own_answer(default_ckpt: Path) -> None:
    cpu, gpu = runtimes(default_ckpt, "bf16", True)
    batches = [real_clips(lengths) for lengths in ([16, 16], [16, 16, 16, 16], [7, 16], [16])]
    pending = [gpu.run(frames, lens) for frames, lens in batches]  # all queued before any is waited for
    assert not any(p.ready for p in pending)
    for (frames, lens), one in zip(batches, pending, strict=True):
        torch.testing.assert_close(one.result(), cpu.run(frames, lens).result(), atol=3e-2, rtol=0)
