"""Export a checkpoint for serving outside fusionserve: ONNX or TorchScript, one clip at a time.

The exported graph classifies ONE clip of any length T: ``frames`` uint8 (T, C, H, W)
-> ``logits`` float32 (1, K). Ragged batching (``lengths.tolist()``, ``pad_sequence``,
``pack_padded_sequence``) cannot be traced, so ``ClipClassifier`` wraps the model for a
single full-length clip: the encoder on the T frames, then the head with no padding.

ONNX uses the ``torch.export`` based exporter (``dynamo=True``); it works for every head.
Three things keep T dynamic (torch 2.13, onnxscript 0.7):
- With dynamic shapes the exporter swaps in a while-loop LSTM decomposition, but it never
  clears the op's dispatch cache, so after one LSTM export in a process the next one can
  take the cached decomposition that unrolls over time and fixes T (seen on
  bidirectional LSTMs). ``export_onnx`` clears that cache first.
- A constraint violation does NOT fail the export: the exporter applies torch.export's
  suggested fix (``T = <example length>``) and writes a fixed-length graph. So
  ``export_onnx`` checks that the graph input's first dimension is still symbolic.
- The example clip has at least 2 frames (torch.export specialises sizes 0 and 1).
The legacy exporter (``dynamo=False``) is not a fallback: it traces all heads, but its
attention graph uses ``EyeLike`` on bool, which onnxruntime's CPU provider cannot run.

TorchScript uses ``torch.jit.trace`` of the same wrapper; the trace matches the ragged
model at lengths other than the example's too (bit-exact on small models, ~1e-6 on the
bundled ones). ``torch.jit.script`` does not
compile the models (``from __future__ import annotations`` hides the types), and
``torch.jit`` is deprecated in torch 2.13, so prefer ONNX.

Every export is checked against the real ragged ``FusedClassifier.forward``
(``check_parity``): random clips of several lengths, max abs logit difference <= 1e-4.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models import Checkpoint, FusedClassifier, load_checkpoint
from models.heads import LSTMHead

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
PARITY_LENGTHS = (1, 5, 8, 16)
PARITY_TOLERANCE = 1e-4


class ClipClassifier(nn.Module):
    """One full-length clip through a FusedClassifier, without ragged packing."""

    def __init__(self, model: FusedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (T, C, H, W) uint8 -> logits (1, K)."""
        feats = self.model.forward_features(frames).unsqueeze(0)  # (1, T, D)
        head = self.model.head
        if isinstance(head, LSTMHead):
            # LSTMHead.forward without packing: with one full-length clip the packed and
            # plain LSTM give the same final hidden states.
            _, (h, _) = head.lstm(feats)  # h: (layers * dirs, 1, H)
            last = torch.cat(list(h[-head.directions :]), dim=-1)  # (1, H * dirs)
            return head.fc(head.dropout(last))
        lengths = torch.full((1,), feats.shape[1], dtype=torch.long, device=feats.device)  # (1,)
        return head(feats, lengths)


def export_onnx(checkpoint_path: str | Path, out_path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``checkpoint_path`` as an ONNX model (frames (T, C, H, W) uint8 -> logits (1, K))."""
    ckpt = load_checkpoint(checkpoint_path)
    _forget_cached_rnn_kernels()
    T = torch.export.Dim("T", min=1)
    program = torch.onnx.export(
        _clip_wrapper(ckpt),
        (_example_clip(ckpt),),
        input_names=["frames"],
        output_names=["logits"],
        opset_version=opset,
        dynamic_shapes=({0: T},),
        dynamo=True,
        verbose=False,
    )
    assert program is not None, "torch.onnx.export(dynamo=True) returned no program"
    shape = program.model.graph.inputs[0].shape
    assert shape is not None, "the exported graph's input has no shape"
    if isinstance(shape[0], int):
        raise RuntimeError(
            f"{checkpoint_path}: the exporter fixed the clip length to {shape[0]} frames; "
            "some operation in the model specialised the dynamic length"
        )
    program.model.metadata_props.update(_metadata(ckpt))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(out)
    log.info("wrote %s (ONNX, opset %s)", out, program.model.opset_imports.get(""))
    return out


def export_torchscript(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write ``checkpoint_path`` as a traced TorchScript module (same contract as the ONNX model).

    The labels and name travel in the archive's extra file ``fusionserve.json``.
    """
    ckpt = load_checkpoint(checkpoint_path)
    traced = torch.jit.trace(_clip_wrapper(ckpt), (_example_clip(ckpt),))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out), _extra_files={"fusionserve.json": json.dumps(_metadata(ckpt))})
    log.info("wrote %s (TorchScript)", out)
    return out


def check_parity(
    checkpoint_path: str | Path, onnx_path: str | Path, lengths: Sequence[int] = PARITY_LENGTHS, seed: int = 0
) -> float:
    """Max abs logit difference between onnxruntime and the ragged PyTorch forward; ValueError if > 1e-4."""
    ort_session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def run(clip: torch.Tensor) -> torch.Tensor:
        (logits,) = ort_session.run(["logits"], {"frames": clip.numpy()})
        return torch.from_numpy(np.asarray(logits))

    return _parity(checkpoint_path, onnx_path, run, lengths, seed)


def check_torchscript_parity(
    checkpoint_path: str | Path, ts_path: str | Path, lengths: Sequence[int] = PARITY_LENGTHS, seed: int = 0
) -> float:
    """As ``check_parity``, for a TorchScript file from ``export_torchscript``."""
    module = torch.jit.load(str(ts_path), map_location="cpu")
    return _parity(checkpoint_path, ts_path, module, lengths, seed)


def export(checkpoint: str | Path, out: str | Path, fmt: str) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` as ``fmt`` (onnx or torchscript), then check parity."""
    if fmt == "onnx":
        path = export_onnx(checkpoint, out)
        diff = check_parity(checkpoint, path)
    elif fmt == "torchscript":
        path = export_torchscript(checkpoint, out)
        diff = check_torchscript_parity(checkpoint, path)
    else:
        raise ValueError(f"unknown export format {fmt!r}; known: {list(FORMATS)}")
    return {"out": str(path), "format": fmt, "max_abs_diff": diff, "lengths": list(PARITY_LENGTHS)}


def _clip_wrapper(ckpt: Checkpoint) -> ClipClassifier:
    return ClipClassifier(ckpt.model).eval()


def _forget_cached_rnn_kernels() -> None:
    """Drop kernels an earlier export cached for ``aten.lstm`` (see the module docstring)."""
    cache = getattr(torch.ops.aten.lstm.input, "_dispatch_cache", None)  # private; absent: nothing to do
    if cache is not None:
        cache.clear()


def _example_clip(ckpt: Checkpoint) -> torch.Tensor:
    """A uint8 (T, C, H, W) clip of the training length; at least 2 frames, or T would be fixed."""
    spec = ckpt.input
    T = max(2, int(spec.frames))
    return torch.zeros(T, spec.channels, spec.height, spec.width, dtype=torch.uint8)


def _metadata(ckpt: Checkpoint) -> dict[str, str]:
    """String key/values for the exported file: enough for a server to label and preprocess."""
    return {
        "name": ckpt.name,
        "version": ckpt.version,
        "labels": json.dumps(ckpt.labels),
        "input": json.dumps(ckpt.input.to_dict()),
    }


def _parity(
    checkpoint_path: str | Path,
    exported_path: str | Path,
    run_clip: Callable[[torch.Tensor], torch.Tensor],
    lengths: Sequence[int],
    seed: int,
) -> float:
    """Run each clip alone through ``run_clip`` and all clips as one ragged batch through the model."""
    ckpt = load_checkpoint(checkpoint_path)
    spec = ckpt.input
    gen = torch.Generator().manual_seed(seed)
    clips = [
        torch.randint(0, 256, (T, spec.channels, spec.height, spec.width), generator=gen, dtype=torch.uint8)
        for T in lengths
    ]
    with torch.inference_mode():
        expected = ckpt.model(torch.cat(clips), torch.tensor(list(lengths)))  # (B, K)
        got = torch.cat([run_clip(clip) for clip in clips])  # (B, K)
    assert got.shape == expected.shape, f"exported model gave {tuple(got.shape)}, expected {tuple(expected.shape)}"
    diff = float((got - expected).abs().max())
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        raise ValueError(f"{exported_path}: max abs logit difference {diff:.3g} exceeds {PARITY_TOLERANCE:g}")
    log.info("%s: max abs logit difference %.3g over lengths %s", exported_path, diff, list(lengths))
    return diff
