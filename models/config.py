"""Plain configs that fully describe a model; a checkpoint stores them as JSON.

Every encoder and head has its own dataclass, chosen by its ``name`` field through
the registry (``models.registry``). ``ModelConfig.to_dict`` / ``from_dict`` round
trip through JSON so that a checkpoint can rebuild exactly the module it was saved
from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SmallCNNConfig:
    """The seed design: one conv block (conv3x3, BN, ReLU, 2x2 max-pool) per width."""

    name: str = "small_cnn"
    widths: tuple[int, ...] = (32, 64, 128)


@dataclass(frozen=True)
class ResNetConfig:
    """A residual CNN: a stem, then stages of basic blocks; each stage after the first halves H, W."""

    name: str = "resnet"
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 2


@dataclass(frozen=True)
class TimmConfig:
    """An image model from timm by its name (``model``), pooled, its classifier removed
    (``models.backbones``). ``grad_checkpointing`` trades compute for activation memory in training."""

    name: str = "timm"
    model: str = "resnet18"
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class TorchvisionConfig:
    """An image model from torchvision by its name (``model``), its last linear layer removed."""

    name: str = "torchvision"
    model: str = "mobilenet_v3_small"
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class MeanHeadConfig:
    """Order-blind baseline: the mean of the frame features, then a linear classifier."""

    name: str = "mean"
    dropout: float = 0.0


@dataclass(frozen=True)
class LSTMHeadConfig:
    name: str = "lstm"
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class AttentionHeadConfig:
    """Transformer encoder over time.

    ``position``: ``sinusoidal`` or ``none`` (then the head is order-blind).
    ``pooling``: ``attention`` (learned softmax weights over frames), ``cls`` or ``mean``.
    ``causal``: each frame attends only to itself and earlier frames, at most
    ``window`` of them (``None``: all earlier frames). Causal heads can stream.
    """

    name: str = "attention"
    dim: int = 128
    layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1
    position: str = "sinusoidal"
    pooling: str = "attention"
    causal: bool = False
    window: int | None = None


EncoderConfig = SmallCNNConfig | ResNetConfig | TimmConfig | TorchvisionConfig
HeadConfig = MeanHeadConfig | LSTMHeadConfig | AttentionHeadConfig


@dataclass(frozen=True)
class ModelConfig:
    """A whole fused classifier: frame encoder + temporal head + input normalisation."""

    num_classes: int
    encoder: EncoderConfig = field(default_factory=SmallCNNConfig)
    head: HeadConfig = field(default_factory=LSTMHeadConfig)
    in_channels: int = 3
    image_size: int = 32
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"mean and std need one value per channel ({self.in_channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        from models.registry import ENCODERS, HEADS  # late: the registry imports this module

        data = dict(data)
        encoder = _sub_config(data.pop("encoder", {"name": "small_cnn"}), ENCODERS.configs(), "encoder")
        head = _sub_config(data.pop("head", {"name": "lstm"}), HEADS.configs(), "head")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(encoder=encoder, head=head, **data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _sub_config(data: dict[str, Any], table: dict[str, type[Any]], kind: str) -> Any:
    data = dict(data)
    name = data.get("name")
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(table)}")
    cls = table[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {kind} config keys for {name!r}: {sorted(unknown)}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)
