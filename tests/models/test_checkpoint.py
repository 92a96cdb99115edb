"""The checkpoint format: round trip, metadata contract, and named failures (never unpickling)."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import (
    CheckpointError,
    InputSpec,
    LSTMHeadConfig,
    ModelConfig,
    SmallCNNConfig,
    build_model,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from models.checkpoint import FORMAT_VERSION, REQUIRED_KEYS

CFG = ModelConfig(3, SmallCNNConfig(widths=(8, 16)), LSTMHeadConfig(hidden=8), image_size=16)
LABELS = ["a", "b", "c"]


def write(path: Path, cfg: ModelConfig = CFG) -> torch.nn.Module:
    model = build_model(cfg).eval()
    spec = InputSpec.for_model(cfg, frames=8, min_frames=4, max_frames=8)
    save_checkpoint(
        path,
        model,
        name="tiny",
        version="3",
        labels=LABELS,
        input_spec=spec,
        metrics={"test": {"accuracy": 0.5}},
        training={"seed": 1},
    )
    return model


def rewrite_metadata(src: Path, dst: Path, change: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["fusionserve"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update(change)
    save_file(tensors, str(dst), metadata={"fusionserve": json.dumps(meta)})


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    model = write(path)
    ckpt = load_checkpoint(path)
    frames, lengths = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8), torch.tensor([4, 5])
    with torch.no_grad():
        assert torch.equal(model(frames, lengths), ckpt.model(frames, lengths))
    assert not ckpt.model.training
    meta = ckpt.metadata
    assert set(REQUIRED_KEYS) <= set(meta)
    assert meta["format_version"] == FORMAT_VERSION
    assert (ckpt.name, ckpt.version, ckpt.labels) == ("tiny", "3", LABELS)
    assert ModelConfig.from_dict(meta["arch"]) == CFG
    assert meta["input"] == {
        "height": 16,
        "width": 16,
        "channels": 3,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "frames": 8,
        "min_frames": 4,
        "max_frames": 8,
    }
    assert meta["metrics"] == {"test": {"accuracy": 0.5}}
    assert meta["training"] == {"seed": 1}
    assert read_metadata(path) == meta
    assert path.stat().st_mode & 0o444 == 0o444  # readable by a server running as another user


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_checkpoint(path)


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write(path)
    data = path.read_bytes()
    for cut in (5, 200, len(data) - 100):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.safetensors: .*(truncated|cannot read|not a readable)"):
            load_checkpoint(bad)


def test_foreign_safetensors_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors: a safetensors file but not a fusionserve"):
        load_checkpoint(path)


def test_not_a_safetensors_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights, just some text that is long enough\n" * 4)
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: truncated or not a safetensors file"):
        load_checkpoint(path)


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_file_is_refused_and_never_unpickled(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.safetensors"
    payload = {"state_dict": {"w": torch.zeros(2)}, "boom": _Boom(str(marker))}
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"evil\.safetensors: looks like a pickle or torch\.save file"):
        load_checkpoint(path)
    assert not marker.exists()
    # The same payload behind a bogus safetensors-looking length prefix is refused too.
    disguised = tmp_path / "disguised.safetensors"
    body = pickle.dumps(payload)
    disguised.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match=r"disguised\.safetensors"):
        load_checkpoint(disguised)
    assert not marker.exists()


def test_wrong_format_version_is_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "v99.safetensors"
    write(good)
    rewrite_metadata(good, bad, {"format_version": 99})
    with pytest.raises(CheckpointError, match=r"v99\.safetensors: format_version 99 is not supported"):
        load_checkpoint(bad)


def test_missing_metadata_keys_are_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "nolabels.safetensors"
    write(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()["fusionserve"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del meta["labels"]
    save_file(tensors, str(bad), metadata={"fusionserve": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"nolabels\.safetensors: metadata lacks required keys \['labels'\]"):
        load_checkpoint(bad)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "mismatch.safetensors"
    write(good)
    arch = CFG.to_dict()
    arch["head"]["hidden"] = 16  # the file's LSTM has hidden 8
    rewrite_metadata(good, bad, {"arch": arch})
    with pytest.raises(
        CheckpointError, match=r"mismatch\.safetensors: weights do not match .*head\.lstm\.weight_hh_l0: shape"
    ):
        load_checkpoint(bad)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.safetensors", tmp_path / "partial.safetensors"
    write(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head.fc.bias"}  # noqa: SIM118
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: .*missing tensors \['head\.fc\.bias'\]"):
        load_checkpoint(bad)


def test_save_refuses_wrong_label_count(tmp_path: Path) -> None:
    model = build_model(CFG)
    spec = InputSpec.for_model(CFG, frames=8, min_frames=1, max_frames=8)
    with pytest.raises(ValueError, match="2 labels for a model with 3 classes"):
        save_checkpoint(tmp_path / "x.safetensors", model, name="x", labels=["a", "b"], input_spec=spec)
