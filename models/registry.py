"""Name -> builder registries for frame encoders, temporal heads and model presets.

Encoders and heads register themselves with their config class, so a config's
``name`` field alone picks the module to build. A duplicate name is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import nn

from models.config import (
    AttentionHeadConfig,
    LSTMHeadConfig,
    MeanHeadConfig,
    ModelConfig,
    SmallCNNConfig,
)

B = TypeVar("B", bound=Callable[..., nn.Module])


class Registry(Generic[B]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type[Any], B]] = {}

    def register(self, name: str, config_cls: type[Any]) -> Callable[[B], B]:
        def decorator(builder: B) -> B:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (config_cls, builder)
            return builder

        return decorator

    def builder(self, name: str) -> B:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}")
        return self._entries[name][1]

    def configs(self) -> dict[str, type[Any]]:
        return {name: cls for name, (cls, _) in self._entries.items()}

    def names(self) -> list[str]:
        return sorted(self._entries)


ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
HEADS: Registry[Callable[..., nn.Module]] = Registry("head")

# Presets behind `python -m training fit --model NAME`: the seed's small CNN under each head.
PresetBuilder = Callable[..., ModelConfig]
_PRESETS: dict[str, PresetBuilder] = {}


def register_preset(name: str) -> Callable[[PresetBuilder], PresetBuilder]:
    def decorator(fn: PresetBuilder) -> PresetBuilder:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn

    return decorator


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset_config(name: str, *, num_classes: int, image_size: int = 32) -> ModelConfig:
    if name not in _PRESETS:
        raise KeyError(f"unknown model {name!r}; known: {preset_names()}")
    return _PRESETS[name](num_classes=num_classes, image_size=image_size)


@register_preset("mean")
def _mean(*, num_classes: int, image_size: int) -> ModelConfig:
    return ModelConfig(num_classes, SmallCNNConfig(), MeanHeadConfig(), image_size=image_size)


@register_preset("lstm")
def _lstm(*, num_classes: int, image_size: int) -> ModelConfig:
    return ModelConfig(num_classes, SmallCNNConfig(), LSTMHeadConfig(), image_size=image_size)


@register_preset("attention")
def _attention(*, num_classes: int, image_size: int) -> ModelConfig:
    return ModelConfig(num_classes, SmallCNNConfig(), AttentionHeadConfig(), image_size=image_size)
