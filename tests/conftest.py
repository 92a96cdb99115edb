"""Shared fixtures: a tiny moving-digits dataset written as real JPEG files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.synth import SynthConfig, write_dataset

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
