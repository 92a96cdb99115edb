"""Shared fixtures: a tiny moving-digits dataset written as real JPEG files, and real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import (
    AttentionHeadConfig,
    InputSpec,
    ModelConfig,
    ResNetConfig,
    SmallCNNConfig,
    build_model,
    default_checkpoint,
    save_checkpoint,
)
from training.synth import LABELS, SynthConfig, write_dataset

TINY = SynthConfig(canvas=16, min_frames=3, max_frames=6, clips_per_label=4, seed=7)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 labels x (4 train, 1 val, 1 test) clips of 3-6 JPEG frames at 16x16."""
    root = tmp_path_factory.mktemp("tiny-digits")
    write_dataset(root, TINY)
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def backbones_importable() -> bool:
    try:
        import timm  # noqa: F401  (imports torchvision)
    except (ImportError, RuntimeError):  # absent, or torchvision cannot load its operators beside this torch
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    if any("backbones" in item.keywords for item in items) and not backbones_importable():
        skips["backbones"] = pytest.mark.skip(
            reason="needs timm and torchvision, which do not import here; make test runs these in .venv-backbones"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def default_ckpt() -> Path:
    return default_checkpoint()


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model slow enough (about 45 ms per 8-frame clip here) that requests pile up behind it."""
    cfg = ModelConfig(
        len(LABELS), ResNetConfig(widths=(32, 64, 128), blocks_per_stage=2), AttentionHeadConfig(dim=64), image_size=64
    )
    path = tmp_path_factory.mktemp("slow") / "slow.safetensors"
    save_checkpoint(
        path,
        build_model(cfg).eval(),
        name="slow",
        labels=list(LABELS),
        input_spec=InputSpec.for_model(cfg, frames=8, min_frames=1, max_frames=16),
    )
    return path


@pytest.fixture(scope="session")
def two_model_dir(tmp_path_factory: pytest.TempPathFactory, default_ckpt: Path) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    (folder / default_ckpt.name).write_bytes(default_ckpt.read_bytes())
    cfg = ModelConfig(3, SmallCNNConfig(widths=(8, 16)), AttentionHeadConfig(dim=16, heads=2), image_size=24)
    save_checkpoint(
        folder / "tiny.safetensors",
        build_model(cfg).eval(),
        name="tiny",
        version="7",
        labels=["a", "b", "c"],
        input_spec=InputSpec.for_model(cfg, frames=4, min_frames=1, max_frames=8),
    )
    return folder
