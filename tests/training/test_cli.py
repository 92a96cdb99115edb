"""The real command line: synth -> fit -> load, resume, config files, evaluate, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import load_checkpoint
from training.synth import LABELS


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=300, cwd=cwd, check=False
    )


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "digits"
    proc = run(
        "synth",
        "--out",
        str(out),
        "--clips-per-label",
        "3",
        "--canvas",
        "16",
        "--min-frames",
        "3",
        "--max-frames",
        "5",
        "--seed",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["clips"] == {"train": 24, "val": 8, "test": 8}
    return out


def test_synth_then_fit_then_load_through_the_cli(cli_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-lstm.safetensors"
    proc = run(*fit_args(cli_dataset, out, "--model", "lstm", "--epochs", "2", "--seed", "4"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs_run"] == 2

    ckpt = load_checkpoint(out)
    meta = ckpt.metadata
    assert ckpt.name == "tiny-lstm" and ckpt.labels == list(LABELS)
    assert meta["arch"]["head"]["name"] == "lstm" and meta["arch"]["image_size"] == 16
    assert meta["input"]["min_frames"] >= 3 and meta["input"]["max_frames"] <= 5
    test = meta["metrics"]["test"]
    assert test["clips"] == 8 and test["split"] == "test" and test["dataset"] == "moving-digits"
    assert 0.0 <= test["accuracy"] <= 1.0 and 0.0 <= test["macro_f1"] <= 1.0
    assert summary["metrics"]["test"] == test
    assert meta["training"]["seed"] == 4 and meta["training"]["epochs_run"] == 2
    assert meta["training"]["profile"]["parameters"] > 0

    lines = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "train_accuracy", "train_clips_per_s", "val_accuracy", "val_macro_f1", "lr"} <= set(lines[0])

    # Evaluating the checkpoint on the test split reproduces the metrics it stores, with its plots.
    report_dir = tmp_path / "report"
    proc = run("evaluate", str(out), str(cli_dataset), "--out", str(report_dir))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((report_dir / "report.json").read_text())
    assert report["accuracy"] == test["accuracy"] and report["macro_f1"] == test["macro_f1"]
    counts = report["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == 8 and sum(counts[i][i] for i in range(8)) == round(report["accuracy"] * 8)
    assert set(report["per_class"]) == set(LABELS) and 0 <= report["top5_accuracy"] <= 1
    for png in ("confusion.png", "curves.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_from_the_saved_epoch(cli_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.safetensors"
    assert run(*fit_args(cli_dataset, out, "--model", "mean", "--epochs", "1")).returncode == 0
    state = out.with_suffix(".train-state.safetensors")
    assert state.is_file()
    proc = run(*fit_args(cli_dataset, out, "--model", "mean", "--epochs", "3", "--resume", str(state)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs_run"] == 2
    lines = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # The learning rate follows one schedule across the resume: cosine reaches zero at the end.
    assert lines[-1]["lr"] == 0.0 and lines[0]["lr"] > lines[1]["lr"]


def test_config_file_sets_architecture_and_flags_override_it(cli_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('model = "attention"\nepochs = 5\n[model_overrides.head]\ndim = 32\nlayers = 1\nheads = 2\n')
    out = tmp_path / "a.safetensors"
    proc = run(*fit_args(cli_dataset, out, "--config", str(config), "--epochs", "1"))
    assert proc.returncode == 0, proc.stderr
    meta = load_checkpoint(out).metadata
    assert meta["arch"]["head"] | {"dim": 32, "layers": 1, "heads": 2} == meta["arch"]["head"]
    assert meta["training"]["config"]["epochs"] == 1 and meta["training"]["epochs_run"] == 1


def test_bad_config_and_missing_data_fail_with_a_message(cli_dataset: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    proc = run(*fit_args(cli_dataset, tmp_path / "x.safetensors", "--config", str(config)))
    assert proc.returncode == 2 and "unknown config keys ['epochz']" in proc.stderr
    proc = run(*fit_args(tmp_path / "nowhere", tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "nowhere" in proc.stderr


@pytest.mark.parametrize("command", [[], ["synth"], ["fit"], ["evaluate"]])
def test_every_command_has_help(command: list[str]) -> None:
    proc = run(*command, "--help")
    assert proc.returncode == 0
    assert "usage: python -m training" in proc.stdout
