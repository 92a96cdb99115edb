"""fit --cache-features: the head trained on features encoded once equals the head trained with the same
encoder frozen, on the same seed; what it refuses; and what the checkpoint says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import build_model, read_metadata
from training.cli import main as cli
from training.config import TrainConfig
from training.fit import seed_everything

FLAGS = ("--image-size", "16", "--frames", "4", "--batch-size", "8", "--epochs", "2", "--no-progress")


def fit(data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert cli(["fit", "--data", str(data), "--out", str(out), *FLAGS, *extra]) == 0
    state = load_file(str(out.with_suffix(".train-state.safetensors")))  # the model after the last epoch
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.parametrize("model", ["lstm", "attention"])
def test_cached_features_train_the_same_head_as_a_frozen_encoder(
    tiny_dataset: Path, tmp_path: Path, model: str
) -> None:
    frozen = fit(tiny_dataset, tmp_path / "frozen.safetensors", "--model", model, "--freeze-encoder", "2")
    cached = fit(tiny_dataset, tmp_path / "cached.safetensors", "--model", model, "--freeze-encoder", "2",
                 "--cache-features")  # fmt: skip
    assert frozen.keys() == cached.keys()
    for key in frozen:
        torch.testing.assert_close(cached[key], frozen[key], atol=1e-4, rtol=0, msg=key)
    seed_everything(0)  # as fit does before it builds the model: its starting weights
    start = build_model(TrainConfig(model=model, image_size=16).model_config(8)).state_dict()
    heads = [k for k in frozen if k.startswith("head.")]
    assert heads and any(not torch.equal(frozen[k], start[k]) for k in heads)  # the head trained
    assert all(torch.equal(frozen[k], start[k]) for k in frozen if k.startswith("encoder."))  # the encoder did not
    meta = read_metadata(tmp_path / "cached.safetensors")
    assert meta["training"]["features_cached"] is True and meta["training"]["encoder_frozen_epochs"] == 2
    assert read_metadata(tmp_path / "frozen.safetensors")["training"]["features_cached"] is False


@pytest.mark.parametrize(
    "extra",
    [
        ("--cache-features",),
        ("--cache-features", "--freeze-encoder", "1"),
        ("--cache-features", "--freeze-encoder", "2", "--augment"),
    ],
)
def test_cached_features_need_an_encoder_frozen_every_epoch_and_no_augmentation(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]
) -> None:
    assert cli(["fit", "--data", str(tiny_dataset), "--out", str(tmp_path / "m.safetensors"), *FLAGS, *extra]) == 2
    assert "cache_features" in capsys.readouterr().err
