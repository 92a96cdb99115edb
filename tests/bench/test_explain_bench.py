"""``python -m bench explain`` on the tiny dataset: its removals are the model's own (numbers never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.__main__ import main
from bench.explain import removal_drops
from models import load_checkpoint
from models.explain import occlusion
from tests.support.media import synth_clip


def test_removing_the_top_frame_is_the_largest_leave_one_out_drop(default_ckpt: Path) -> None:
    model = load_checkpoint(default_ckpt).model.eval()
    frames = torch.from_numpy(synth_clip("left", frames=9, seed=2)).permute(0, 3, 1, 2)  # (T, C, H, W)
    row = removal_drops(model, frames, k=1, draws=4, rng=np.random.default_rng(0))
    importance = occlusion(model, frames).importance
    assert row["top_drop"] == pytest.approx(float(importance.max()), abs=1e-5)
    assert min(importance.tolist()) - 1e-5 <= row["random_drop"] <= max(importance.tolist()) + 1e-5
    assert len(row["after_random"]) == 4


def test_the_bench_reports_both_removals_for_each_checkpoint(
    tiny_dataset: Path, default_ckpt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "explain.json"
    argv = ["explain", "--checkpoint", str(default_ckpt), "--data", str(tiny_dataset), "--k", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert model["checkpoint"] == default_ckpt.name and model["head"] == "lstm"
    assert model["clips"] + model["skipped_shorter_than_k"] == 8  # the tiny test split: one clip a label
    assert -1 <= model["mean_random_k_drop"] <= 1 and -1 <= model["mean_top_k_drop"] <= 1
