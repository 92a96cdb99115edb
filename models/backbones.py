"""Image models from timm and torchvision as frame encoders, built by name.

A checkpoint holds the encoder's config (which library, which model) and its weights. Loading
builds the architecture without weights (timm's ``pretrained=False``, torchvision's
``weights=None``) and then takes the file's: nothing is fetched and nothing is unpickled. Both
libraries are the ``[backbones]`` extra, imported only when such an encoder is built.

The classifier is removed (timm: ``num_classes=0``; torchvision: the last linear layer becomes an
identity), so the encoder maps frames (N, C, H, W) to pooled features (N, D), and D is measured
on the built model. Starting weights (``load_weights``) may be a timm or torchvision state dict
with or without its classifier, or a fusionserve checkpoint of the same backbone.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.config import TimmConfig, TorchvisionConfig
from models.registry import ENCODERS

log = logging.getLogger(__name__)
PROBE_SIZE = 64  # pixels of the blank frame that measures a backbone's feature size


class BackboneError(ValueError):
    """A backbone that cannot be built, or weights that do not fit it."""


@dataclass(frozen=True)
class BackboneDefaults:
    """How a backbone's published weights were trained: its input normalisation and size."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int


def _timm() -> Any:
    try:
        import timm
    except (ImportError, RuntimeError) as exc:  # or torchvision beneath it fails to load its operators
        raise BackboneError(
            f"timm encoders need the [backbones] extra: pip install 'fusionserve[backbones]' ({exc})"
        ) from exc
    return timm


def _torchvision_models() -> Any:
    try:
        import torchvision.models
    except (ImportError, RuntimeError) as exc:
        raise BackboneError(
            f"torchvision encoders need the [backbones] extra: pip install 'fusionserve[backbones]' ({exc})"
        ) from exc
    return torchvision.models


class Backbone(nn.Module):
    """An image model, classifier removed: frames (N, C, H, W) normalised -> features (N, D)."""

    def __init__(self, model: nn.Module, *, source: str, name: str, dropped: str, in_channels: int) -> None:
        super().__init__()
        self.model = model
        self.source, self.model_name = source, name
        self.dropped = dropped  # the removed classifier's state-dict prefix: its keys in a weights file are skipped
        self.out_features = probe(model, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)  # (N, D)

    def fold(self) -> int:
        """For serving, in eval mode: fold each batch norm that alone reads a convolution's output into
        that convolution (``fold_into_convs``); returns how many. A model fx cannot trace stays as is."""
        try:
            return fold_into_convs(self.model)
        except Exception as exc:  # tracing fails on data-dependent control flow
            log.info("%s:%s: batch norms not folded (%s)", self.source, self.model_name, exc)
            return 0


class NormLeaves(torch.fx.Tracer):
    """Traces a model keeping its batch norms whole (timm's norm + activation layers included)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def fold_into_convs(model: nn.Module) -> int:
    """Find, by tracing ``model`` with torch.fx, each batch norm whose input is a Conv2d's output
    read by nothing else; fold the norm into the conv (``fuse_conv_bn_eval``) and put in the norm's
    place what it did after normalising (timm's activation, or nothing). The model stays the same
    module tree, in place. Returns how many."""
    graph = NormLeaves().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, norm = modules[str(src.target)], modules[str(node.target)]
        if not (isinstance(conv, nn.Conv2d) and isinstance(norm, _BatchNorm) and norm.track_running_stats):
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:  # a module called twice keeps its own
            continue
        model.set_submodule(str(src.target), fuse_conv_bn_eval(conv, norm))
        after = (
            nn.Sequential(cast(nn.Module, norm.drop), cast(nn.Module, norm.act))
            if hasattr(norm, "act")
            else nn.Identity()
        )
        model.set_submodule(str(node.target), after)
        folded += 1
    return folded


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


@torch.no_grad()
def probe(model: nn.Module, in_channels: int) -> int:
    """The feature size of ``model``: its output's width on one blank frame."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(1, in_channels, PROBE_SIZE, PROBE_SIZE))
    model.train(was_training)
    return int(out.flatten(1).shape[1])


def defaults(source: str, name: str) -> BackboneDefaults:
    """The normalisation and input size of ``name``'s published weights (no download)."""
    if source == "timm":
        timm = _timm()
        cfg = timm.get_pretrained_cfg(name)
        if cfg is None:
            raise BackboneError(f"timm has no model {name!r} (timm.list_models() lists them)")
        return BackboneDefaults(tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]))
    tv = _torchvision_models()
    try:
        weights = tv.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise BackboneError(f"torchvision has no model {name!r} with weights ({exc})") from exc
    transforms = weights.transforms()
    return BackboneDefaults(tuple(transforms.mean), tuple(transforms.std), int(transforms.crop_size[0]))


def build_timm_model(name: str, in_channels: int, *, pretrained: bool = False) -> Any:
    """timm's ``name`` with no classifier (an ``nn.Module`` with timm's own methods)."""
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_channels)
    except RuntimeError as exc:  # "Unknown model"
        raise BackboneError(f"timm cannot build {name!r}: {exc}") from exc


def build_torchvision_model(name: str, in_channels: int, *, pretrained: bool = False) -> tuple[nn.Module, str]:
    """torchvision's ``name`` with its last linear layer an identity, and that layer's name."""
    tv = _torchvision_models()
    if in_channels != 3:
        raise BackboneError(f"torchvision models take 3 channels, not {in_channels}")
    try:
        model = tv.get_model(name, weights="DEFAULT" if pretrained else None)
    except ValueError as exc:
        raise BackboneError(f"torchvision has no model {name!r}") from exc
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = last.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model, last


@ENCODERS.register("timm", TimmConfig)
def build_timm(cfg: TimmConfig, *, in_channels: int) -> nn.Module:
    model = build_timm_model(cfg.model, in_channels)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    classifier = str(model.pretrained_cfg.get("classifier") or "fc")
    return Backbone(model, source="timm", name=cfg.model, dropped=classifier + ".", in_channels=in_channels)


@ENCODERS.register("torchvision", TorchvisionConfig)
def build_torchvision(cfg: TorchvisionConfig, *, in_channels: int) -> nn.Module:
    if cfg.grad_checkpointing:
        raise BackboneError("gradient checkpointing is available for timm encoders only")
    model, last = build_torchvision_model(cfg.model, in_channels)
    return Backbone(model, source="torchvision", name=cfg.model, dropped=last + ".", in_channels=in_channels)


def published_weights(encoder: Backbone) -> dict[str, torch.Tensor]:
    """The weights the library publishes for ``encoder``'s model (downloads them: a machine that can)."""
    if encoder.source == "timm":
        return dict(build_timm_model(encoder.model_name, 3, pretrained=True).state_dict())
    model, _ = build_torchvision_model(encoder.model_name, 3, pretrained=True)
    return dict(model.state_dict())


def load_weights(encoder: Backbone, state: dict[str, torch.Tensor], origin: str) -> None:
    """Start ``encoder`` from ``state``: the model's own keys (its classifier's are skipped), or a
    fusionserve checkpoint's ``encoder.model.*``. Raises ``BackboneError`` naming the keys that are
    missing, unexpected or of another shape."""
    prefix = "encoder.model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = encoder.model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(encoder.dropped)]
    wrong = [
        f"{k} {tuple(state[k].shape)} (needs {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise BackboneError(f"{origin} does not fit {encoder.source}:{encoder.model_name}: " + "; ".join(problems))
    encoder.model.load_state_dict({k: state[k] for k in own})
