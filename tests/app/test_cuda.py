"""The CUDA path of the runtime (pinned memory, non-blocking copies); skipped where no GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.runtime import ModelRuntime
from models import load_checkpoint


@pytest.mark.gpu
def test_cuda_runtime_matches_cpu(default_ckpt: Path) -> None:
    cpu = ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"))
    gpu = ModelRuntime(load_checkpoint(default_ckpt, device="cuda"), torch.device("cuda"))
    frames = torch.randint(0, 256, (5 + 16, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    lengths = torch.tensor([5, 16])
    expected, got = cpu.infer(frames, lengths), gpu.infer(frames, lengths)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
