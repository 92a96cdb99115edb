"""Parameters and FLOPs per clip for a model config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.classifier import FusedClassifier, build_model
from models.config import ModelConfig


@dataclass(frozen=True)
class ModelProfile:
    parameters: int
    flops_per_clip: int  # one clip of `frames` frames, forward pass
    frames: int

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "flops_per_clip": self.flops_per_clip, "frames": self.frames}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def profile_model(model: FusedClassifier, frames: int) -> ModelProfile:
    """Count a forward pass over one clip of ``frames`` frames at the model's input size."""
    cfg = model.config
    clip = torch.zeros(frames, cfg.in_channels, cfg.image_size, cfg.image_size)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(clip, torch.tensor([frames]))
    model.train(was_training)
    flops = counter.get_total_flops() + model.head.extra_flops(frames)
    return ModelProfile(count_parameters(model), int(flops), frames)


def profile_config(config: ModelConfig, frames: int = 16) -> ModelProfile:
    return profile_model(build_model(config), frames)


def encoder_name(config: ModelConfig) -> str:
    """``small_cnn``, ``resnet``, or a backbone as ``timm:NAME`` / ``torchvision:NAME``."""
    model = getattr(config.encoder, "model", None)
    return f"{config.encoder.name}:{model}" if model else config.encoder.name


@torch.no_grad()
def profile_encoder(model: FusedClassifier) -> dict[str, int | str]:
    """The frame encoder's name, parameters and FLOPs for one frame at the model's input size."""
    cfg = model.config
    frame = torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model.forward_features(frame)
    model.train(was_training)
    return {
        "name": encoder_name(cfg),
        "parameters": count_parameters(model.encoder),
        "flops_per_frame": int(counter.get_total_flops()),
    }
