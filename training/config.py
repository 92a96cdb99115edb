"""Training configuration: defaults < TOML config file < command-line flags.

A TOML file sets any ``TrainConfig`` field at top level and may override the model
preset's architecture in a ``[model_overrides]`` table, for example::

    model = "attention"
    epochs = 30
    [model_overrides.head]
    layers = 3
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import ModelConfig, preset_config
from models.backbones import defaults


@dataclass
class TrainConfig:
    model: str = "lstm"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    frames: int = 16  # clips longer than this are sampled down to it (TSN segments)
    image_size: int | None = None  # default: the backbone's own input size, else 32
    patience: int = 5  # epochs without a better val accuracy before stopping
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    augment: bool = False  # random resized crop (+ horizontal flip unless hflip = false)
    hflip: bool = True  # off for tasks where left and right differ (moving digits)
    repeat_short: bool = False  # repeat frames of clips shorter than `frames` (default: keep them short)
    eval_clips: int = 1  # temporal clips per video averaged at evaluation
    preload: bool | None = None  # decode frame datasets into memory once (default: when small)
    name: str | None = None  # model name in the checkpoint; default: the output file's stem
    version: str = "1"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    encoder: str | None = None  # "timm:NAME" or "torchvision:NAME" (default: the preset's small CNN)
    pretrained: str | None = None  # with encoder: "hub" (the library downloads its weights) or a .safetensors file
    freeze_encoder: int = 0  # epochs with the encoder frozen (its batch norms in eval mode) before fine-tuning
    encoder_lr_mult: float = 1.0  # the encoder's learning rate, as a multiple of lr
    grad_checkpointing: bool = False  # timm encoders: recompute activations in the backward pass
    cache_features: bool = False  # encoder frozen the whole run: encode each frame once, train the head on that

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "frames": self.frames >= 1,
            "image_size": self.image_size is None or self.image_size >= 8,
            "freeze_encoder": self.freeze_encoder >= 0,
            "encoder_lr_mult": self.encoder_lr_mult > 0,
            "encoder": self.encoder is None or self.encoder.partition(":")[0] in ("timm", "torchvision"),
            "pretrained": self.pretrained is None or self.encoder is not None,
            # cached features are a frozen encoder's: frozen for every epoch, and no augmentation to vary them
            "cache_features": not self.cache_features or (self.freeze_encoder >= self.epochs and not self.augment),
            "patience": self.patience >= 1,
            "warmup_epochs": self.warmup_epochs >= 0,
            "grad_clip": self.grad_clip > 0,
            "workers": self.workers >= 0,
            "eval_clips": self.eval_clips >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training config values: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self, num_classes: int) -> ModelConfig:
        """The preset for ``model`` at ``image_size``, its encoder replaced by ``encoder`` when given
        (with the backbone's own normalisation, and its input size unless ``image_size`` is set),
        with ``model_overrides`` merged in."""
        base = preset_config(self.model, num_classes=num_classes, image_size=self.image_size or 32).to_dict()
        if self.encoder is not None:
            source, _, name = self.encoder.partition(":")
            known = defaults(source, name)
            base |= {"mean": known.mean, "std": known.std, "image_size": self.image_size or known.input_size}
            base["encoder"] = {"name": source, "model": name, "grad_checkpointing": self.grad_checkpointing}
        return ModelConfig.from_dict(_merge(base, self.model_overrides))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Build a config from an optional TOML file, then non-None ``overrides`` (CLI flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        with Path(path).open("rb") as f:
            values = tomllib.load(f)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)
