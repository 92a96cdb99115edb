"""Frame encoders: CNNs that map frames (N, C, H, W) to features (N, D).

Both end in global average pooling, so any input size works and ``out_features``
(D) comes from the config's last width.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.backbones import Backbone
from models.config import ResNetConfig, SmallCNNConfig
from models.registry import ENCODERS


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
    )


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return conv_bn(c_in, c_out, stride).append(nn.ReLU(inplace=True))


def fold_batchnorm(module: nn.Module) -> int:
    """For inference: fold every BatchNorm2d that directly follows a Conv2d in a Sequential into
    that conv's weights and bias, in place (the norm becomes an Identity), and a backbone's batch
    norms as its ``fold`` finds them. Returns how many.

    In eval mode a batch norm is a fixed per-channel scale and shift, so the folded conv gives
    the same outputs (to float rounding) without a pass over, and a buffer for, its output.
    Only for a model that is served, never trained or saved again: its parameters change.
    """
    if module.training:
        raise ValueError("fold_batchnorm is for a model in eval mode")
    folded = sum(m.fold() for m in list(module.modules()) if isinstance(m, Backbone))  # by torch.fx
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            conv, norm = seq._modules[first], seq._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq._modules[first] = fuse_conv_bn_eval(conv, norm)
                seq._modules[second] = nn.Identity()
                folded += 1
    return folded


class SmallCNN(nn.Module):
    """The seed design: per width one conv3x3 + BN + ReLU block and a 2x2 max-pool.

    Each block runs as conv + BN, then the pool, then the ReLU: max and ReLU commute
    (``relu(max(a, b)) == max(relu(a), relu(b))``), so the outputs and gradients are those of
    conv + BN + ReLU + pool to the bit, and the ReLU passes over a quarter of the values
    (docs/performance.md). The parameters keep their names (``features.{2i}.{0,1}``): the pool
    and the ReLU have none.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        assert widths, "SmallCNN needs at least one width"
        blocks: list[nn.Module] = []
        c_in = in_channels
        for width in widths:
            blocks += [conv_bn(c_in, width), nn.Sequential(nn.MaxPool2d(2), nn.ReLU(inplace=True))]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float -> (N, D)."""
        return self.pool(self.features(x)).flatten(1)  # (N, D)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut, as in ResNet-18."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            # ResNet-D shortcut: average-pool, then a 1x1 conv at stride 1. (A strided 1x1 conv
            # also crashes torch 2.13's CPU backward on channels_last inputs.)
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride != 1 else nn.Identity(),
                nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
                nn.BatchNorm2d(c_out),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """A stem conv, then one stage of ``blocks_per_stage`` basic blocks per width."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], blocks_per_stage: int) -> None:
        super().__init__()
        assert widths and blocks_per_stage >= 1, "ResNetEncoder needs widths and >= 1 block per stage"
        self.stem = conv_bn_relu(in_channels, widths[0])
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(c_in if j == 0 else width, width, stride if j == 0 else 1) for j in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) float -> (N, D)."""
        return self.pool(self.stages(self.stem(x))).flatten(1)  # (N, D)


@ENCODERS.register("small_cnn", SmallCNNConfig)
def build_small_cnn(cfg: SmallCNNConfig, *, in_channels: int) -> nn.Module:
    return SmallCNN(in_channels, cfg.widths)


@ENCODERS.register("resnet", ResNetConfig)
def build_resnet(cfg: ResNetConfig, *, in_channels: int) -> nn.Module:
    return ResNetEncoder(in_channels, cfg.widths, cfg.blocks_per_stage)
