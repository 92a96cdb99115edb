"""The bundled checkpoints: present, small, loadable, and as accurate as their metadata says.

The accuracy check regenerates the held-out moving-digits test split from the seed
recorded in each checkpoint, writes it as JPEG files, and measures the model again:
the recorded number must be reproducible, not just present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from models import bundled_checkpoints, default_checkpoint, load_checkpoint, read_metadata
from models.weights import WEIGHTS_DIR
from training.data import ClipDataset, collate_ragged
from training.evaluate import evaluate
from training.synth import LABELS, SynthConfig, write_dataset

BASELINE = WEIGHTS_DIR / "baselines" / "moving-digits-mean.safetensors"
ALL = [*bundled_checkpoints(), BASELINE]
MAX_BYTES = 5 * 1024 * 1024


def test_default_and_attention_models_are_bundled() -> None:
    names = {read_metadata(p)["name"] for p in bundled_checkpoints()}
    assert names == {"moving-digits-lstm", "moving-digits-attention"}
    assert read_metadata(default_checkpoint())["arch"]["head"]["name"] == "lstm"
    assert BASELINE.is_file()


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_bundled_checkpoint_is_small_and_loads(path: Path) -> None:
    assert path.stat().st_size <= MAX_BYTES
    ckpt = load_checkpoint(path)
    assert ckpt.labels == list(LABELS)
    assert ckpt.metadata["training"]["wall_time_s"] <= 15 * 60


@pytest.fixture(scope="module")
def regenerated_test_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = read_metadata(default_checkpoint())["training"]["dataset"]["train"]["source"]
    root = tmp_path_factory.mktemp("moving-digits-test")
    write_dataset(root, SynthConfig(**source["config"]), splits=("test",))
    return root


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_recorded_test_metrics_are_reproduced(path: Path, regenerated_test_split: Path) -> None:
    ckpt = load_checkpoint(path)
    recorded = ckpt.metadata["metrics"]["test"]
    spec = ckpt.input
    ds = ClipDataset(regenerated_test_split, "test", image_size=spec.height, frames=spec.frames, labels=ckpt.labels)
    measured = evaluate(ckpt.model, DataLoader(ds, batch_size=64, collate_fn=collate_ragged), ckpt.model.mean.device)
    assert measured["clips"] == recorded["clips"] == 800
    assert measured["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-6)
    assert measured["macro_f1"] == pytest.approx(recorded["macro_f1"], abs=1e-6)
    if ckpt.metadata["arch"]["head"]["name"] == "mean":
        assert recorded["accuracy"] <= 0.60  # order-blind: cannot tell a motion from its reversal
    else:
        assert recorded["accuracy"] >= 0.97
