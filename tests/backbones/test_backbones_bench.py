"""``python -m bench backbones`` on tiny settings: its parameters, FLOPs and accuracy are the models' own
(speed never asserted). Runs where timm imports (make pytest-backbones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.backbones import model_config
from models import build_model, count_parameters, read_metadata
from models.profile import profile_encoder

pytestmark = pytest.mark.backbones

ENCODERS = ["small_cnn", "timm:regnety_002"]
SIZE, SMALL, FRAMES, BATCHES = 48, 16, 4, [1, 2]


@pytest.fixture(scope="module")
def result(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run: both encoders timed at two sizes and two batches, and each trained one epoch."""
    tmp = tmp_path_factory.mktemp("backbones-bench")
    argv = ["backbones", "--encoders", *ENCODERS, "--input-size", str(SIZE), "--small-size", str(SMALL)]
    argv += ["--frames", str(FRAMES), "--batches", *map(str, BATCHES), "--min-time", "0.05"]
    argv += ["--quiet-wait", "0", "--threads", "1"]  # one thread: another tenant's burst stalls two many times over
    argv += ["--accuracy", "--data", str(tiny_dataset), "--epochs", "1", "--train-batch-size", "8"]
    argv += ["--checkpoints", str(tmp / "ckpt"), "--out", str(tmp / "backbones.json")]
    assert main(argv) == 0
    return json.loads((tmp / "backbones.json").read_text())


def test_each_encoder_is_timed_at_both_sizes_and_every_batch(result: dict) -> None:
    assert result["torch"] and result["machine"]["cpus"] and result["torch_threads"] == 1
    assert [row["encoder"] for row in result["encoders"]] == ENCODERS
    for row in result["encoders"]:
        assert "error" not in row, row
        cells = {(c["image_size"], c["batch"]): c for c in row["speed"]}
        assert set(cells) == {(s, b) for s in (SIZE, SMALL) for b in BATCHES}
        for cell in cells.values():
            assert cell["frames"] == FRAMES and cell["repetitions"] >= 1
            assert cell["clips_per_s"] == pytest.approx(cell["batch"] / cell["median_s"])
            assert 0 < cell["fastest_s"] <= cell["median_s"]
    timm_row = result["encoders"][1]
    assert timm_row["batchnorms_folded"] > 0  # served as the server serves it


def test_parameters_and_flops_are_those_of_the_built_encoder(result: dict) -> None:
    for row in result["encoders"]:
        model = build_model(model_config(row["encoder"], SIZE))
        assert row["input_size"] == SIZE
        assert (
            row["parameters"] == count_parameters(model.encoder) == sum(p.numel() for p in model.encoder.parameters())
        )
        assert row["flops_per_frame"] == profile_encoder(model)["flops_per_frame"] > 0
    small, timm_row = result["encoders"]
    assert small["parameters"] < timm_row["parameters"]


def test_the_accuracy_is_the_trained_checkpoints_own(result: dict, tiny_dataset: Path) -> None:
    assert result["settings"]["accuracy"]["data"] == str(tiny_dataset)
    for row in result["encoders"]:
        acc = row["accuracy"]
        assert "error" not in acc, acc["error"]
        metadata = read_metadata(Path(acc["checkpoint"]))
        assert acc["test_accuracy"] == metadata["metrics"]["test"]["accuracy"]
        assert 0 <= acc["test_accuracy"] <= 1 and acc["test_clips"] == 8  # the tiny test split: a clip a label
        assert acc["epochs_run"] == 1 and acc["fit_wall_time_s"] > 0
        encoder = metadata["arch"]["encoder"]
        name = encoder["name"] if encoder["name"] == "small_cnn" else f"{encoder['name']}:{encoder['model']}"
        assert name == row["encoder"] and metadata["arch"]["image_size"] == SMALL
