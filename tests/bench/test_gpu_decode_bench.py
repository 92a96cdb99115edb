"""``python -m bench gpu-decode`` with tiny settings: the CPU path's figures and the accuracy check run
anywhere; without CUDA (or torchvision that decodes on it) the GPU part is skipped and says why."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.gpu_decode import GpuJpeg
from bench.__main__ import main


def test_the_bench_writes_the_cpu_rates_and_says_why_the_gpu_part_was_skipped(
    tiny_dataset: Path, default_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu-decode.json"
    argv = ["gpu-decode", "--sizes", "48", "--clips", "1", "--threads", "2", "--min-time", "0.01", "--out", str(out)]
    argv += ["--accuracy", "--checkpoint", str(default_ckpt), "--data", str(tiny_dataset), "--accuracy-sizes", "32"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    [row] = result["rates"]
    assert row["source"] == "48x48" and set(row["cpu"]) == {"1_thread", "2_threads"}
    assert all(r["frames_per_s"] > 0 and r["runs"] >= 2 for r in row["cpu"].values())
    assert result["machine"]["torch"] == torch.__version__
    [acc] = result["accuracy"]["sizes"]
    assert acc["clips"] == 8 and 0 <= acc["cpu_accuracy"] <= 1  # the tiny test split: one clip a label
    reason = GpuJpeg.unavailable(torch.device("cuda"))
    if reason is None:  # a GPU that decodes JPEG: its figures are there
        assert row["gpu"] is not None and result["gpu_skipped"] is None and "gpu_accuracy" in acc
    else:
        assert row["gpu"] is None and result["gpu_skipped"] == reason and "gpu_accuracy" not in acc


def test_the_stand_in_says_why_it_cannot_run_where_torchvision_does_not_import(
    tiny_dataset: Path, default_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu-decode.json"
    argv = ["gpu-decode", "--sizes", "48", "--clips", "1", "--threads", "1", "--min-time", "0.01", "--out", str(out)]
    argv += ["--accuracy", "--stand-in", "--checkpoint", str(default_ckpt), "--data", str(tiny_dataset)]
    assert main([*argv, "--accuracy-sizes", "32"]) == 0
    acc = json.loads(out.read_text())["accuracy"]
    [row] = acc["sizes"]
    if acc["gpu_skipped"] is None:  # a GPU, or torchvision on the CPU standing in: both figures
        assert 0 <= row["gpu_accuracy"] <= 1 and row["pixel_max_abs_diff"] >= 0
    else:  # neither: the reason names torchvision
        assert "torchvision" in acc["gpu_skipped"] and "gpu_accuracy" not in row
