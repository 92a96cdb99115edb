"""Export to ONNX and TorchScript: one clip of any length gives the ragged model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import training.export as export_mod
from models import (
    AttentionHeadConfig,
    InputSpec,
    LSTMHeadConfig,
    MeanHeadConfig,
    ModelConfig,
    SmallCNNConfig,
    build_model,
    default_checkpoint,
    read_metadata,
    save_checkpoint,
)
from models.config import HeadConfig
from training.export import check_parity, check_torchscript_parity, export, export_onnx, export_torchscript

LENGTHS = (1, 3, 7, 12)  # the example clip has 4 frames: none of these is the traced length
LABELS = ["left", "right", "up"]
# In this order the bidirectional LSTM is exported after another LSTM in the same process,
# which is what used to fix its length (see training/export.py).
HEADS: dict[str, HeadConfig] = {
    "mean": MeanHeadConfig(),
    "lstm": LSTMHeadConfig(hidden=16),
    "lstm-bidirectional-2-layers": LSTMHeadConfig(hidden=16, layers=2, bidirectional=True),
    "attention": AttentionHeadConfig(dim=16, heads=2, layers=2),
    "attention-causal-window": AttentionHeadConfig(dim=16, heads=2, layers=2, causal=True, window=3),
}


def make_checkpoint(path: Path, head: HeadConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(num_classes=len(LABELS), encoder=SmallCNNConfig(widths=(8, 16)), head=head, image_size=16)
    spec = InputSpec.for_model(config, frames=4, min_frames=1, max_frames=16)
    return save_checkpoint(path, build_model(config), name=f"tiny-{head.name}", labels=LABELS, input_spec=spec)


@pytest.fixture(scope="module", params=list(HEADS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, ONNX file) for one tiny random-weight model per head."""
    folder = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(folder / "model.safetensors", HEADS[request.param])
    return ckpt, export_onnx(ckpt, folder / "model.onnx")


def test_onnx_matches_ragged_forward_at_any_length(exported: tuple[Path, Path]) -> None:
    ckpt, onnx_path = exported
    assert check_parity(ckpt, onnx_path, lengths=LENGTHS) <= 1e-4


def test_onnx_graph_takes_uint8_frames_of_dynamic_length(exported: tuple[Path, Path]) -> None:
    graph = onnx.load(str(exported[1])).graph
    (frames,) = graph.input
    (logits,) = graph.output
    assert frames.name == "frames"
    assert frames.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = frames.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert logits.name == "logits"
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert logits.type.tensor_type.shape.dim[1].dim_value == len(LABELS)


def test_onnx_metadata_holds_labels_and_name(exported: tuple[Path, Path]) -> None:
    ckpt, onnx_path = exported
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["labels"]) == LABELS
    assert props["name"] == read_metadata(ckpt)["name"]
    assert json.loads(props["input"])["height"] == 16


def test_parity_check_rejects_a_model_with_other_weights(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, onnx_path = exported
    head = ModelConfig.from_dict(read_metadata(ckpt)["arch"]).head
    other = make_checkpoint(tmp_path / "other.safetensors", head, seed=1)
    with pytest.raises(ValueError, match="max abs logit difference"):
        check_parity(other, onnx_path, lengths=LENGTHS)


@pytest.mark.parametrize("head", list(HEADS))
def test_torchscript_matches_ragged_forward_at_any_length(head: str, tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "model.safetensors", HEADS[head])
    ts_path = export_torchscript(ckpt, tmp_path / "model.pt")
    assert check_torchscript_parity(ckpt, ts_path, lengths=LENGTHS) <= 1e-4
    extra = {"fusionserve.json": ""}
    torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(json.loads(extra["fusionserve.json"])["labels"]) == LABELS


def test_export_of_the_default_checkpoint_matches(tmp_path: Path) -> None:
    result = export(default_checkpoint(), tmp_path / "default.onnx", "onnx")
    assert result["format"] == "onnx"
    assert result["out"] == str(tmp_path / "default.onnx")
    assert result["lengths"] == [1, 5, 8, 16]
    assert result["max_abs_diff"] <= 1e-4


def test_export_rejects_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(default_checkpoint(), tmp_path / "model.tflite", "tflite")


class FixedLength(nn.Module):
    """Reads T as a Python int, so torch.export can only specialise it."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, int(frames.shape[0]))


def test_onnx_export_refuses_a_graph_with_a_fixed_length(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The exporter silently fixes T to the example length on a constraint violation.
    monkeypatch.setattr(export_mod, "_clip_wrapper", lambda ckpt: FixedLength())
    ckpt = make_checkpoint(tmp_path / "model.safetensors", MeanHeadConfig())
    with pytest.raises(RuntimeError, match="fixed the clip length to 4 frames"):
        export_onnx(ckpt, tmp_path / "model.onnx")
