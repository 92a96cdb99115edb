"""The checkpoint format: one ``.safetensors`` file, weights plus JSON metadata.

The header metadata holds one JSON document under the key ``fusionserve``: format
version, name, version, the model config (``arch``), labels, the input spec, metrics
and training provenance. Loading reads the header and raw tensors only; nothing is
ever unpickled. Every failure raises ``CheckpointError`` naming the file and the fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.classifier import FusedClassifier
from models.config import ModelConfig

FORMAT_VERSION = 1
METADATA_KEY = "fusionserve"
REQUIRED_KEYS = ("format_version", "name", "version", "arch", "labels", "input", "metrics", "training", "created_at")
_PICKLE_SIGNS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frames: int  # clip length used in training; the default for sampling videos
    min_frames: int
    max_frames: int

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """The spec as ``to_dict`` wrote it (lists back to tuples); unknown keys are an error."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})  # type: ignore[arg-type]

    @classmethod
    def for_model(cls, config: ModelConfig, *, frames: int, min_frames: int, max_frames: int) -> InputSpec:
        return cls(
            config.image_size,
            config.image_size,
            config.in_channels,
            config.mean,
            config.std,
            frames,
            min_frames,
            max_frames,
        )


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and its metadata."""

    path: Path
    model: FusedClassifier
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def input(self) -> InputSpec:
        """What the model takes: frame size, channels, normalisation, clip lengths."""
        return InputSpec.from_dict(self.metadata["input"])


def save_checkpoint(
    path: str | Path,
    model: FusedClassifier,
    *,
    name: str,
    labels: list[str],
    input_spec: InputSpec,
    version: str = "1",
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its metadata to ``path`` (a ``.safetensors`` file), atomically."""
    path = Path(path)
    if len(labels) != model.config.num_classes:
        raise ValueError(f"{len(labels)} labels for a model with {model.config.num_classes} classes")
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "arch": model.config.to_dict(),
        "labels": list(labels),
        "input": input_spec.to_dict(),
        "metrics": metrics or {},
        "training": training or {},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.chmod(0o644)  # safetensors creates files 0600; a server running as another user must read them
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``fusionserve`` metadata of a checkpoint, validated, without loading weights."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(
            path, f"a safetensors file but not a fusionserve checkpoint (no {METADATA_KEY!r} metadata)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"{METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"{METADATA_KEY!r} metadata must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(path, f"metadata lacks required keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            path, f"format_version {meta['format_version']!r} is not supported (this build reads {FORMAT_VERSION})"
        )
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint into a model in eval mode on ``device``."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_dict(meta["arch"])
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"invalid model config in metadata ({exc})") from exc
    if len(meta["labels"]) != config.num_classes:
        raise CheckpointError(path, f"{len(meta['labels'])} labels but the model has {config.num_classes} classes")
    model = FusedClassifier(config)
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read tensors ({exc})") from exc
    problems = _compare(expected, tensors)
    if problems:
        raise CheckpointError(path, "weights do not match the model config: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return Checkpoint(path=path, model=model, metadata=meta)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if not path.is_file():
        raise CheckpointError(path, "not a file")
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(path, f"truncated: {len(head)} bytes is too short for a safetensors header")
    if head.startswith(_PICKLE_SIGNS):
        raise CheckpointError(
            path, "looks like a pickle or torch.save file; fusionserve only loads .safetensors and never unpickles"
        )
    header_len = int.from_bytes(head, "little")
    size = path.stat().st_size
    if header_len + 8 > size:
        raise CheckpointError(
            path, f"truncated or not a safetensors file: header claims {header_len} bytes, file has {size}"
        )


def _compare(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key in sorted(set(expected) & set(found)):
        if expected[key].shape != found[key].shape:
            problems.append(f"{key}: shape {tuple(found[key].shape)} != expected {tuple(expected[key].shape)}")
        elif expected[key].dtype != found[key].dtype:
            problems.append(f"{key}: dtype {found[key].dtype} != expected {expected[key].dtype}")
    return problems
