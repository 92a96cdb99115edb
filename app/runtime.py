"""One loaded model on one device: warm-up and batched forward passes.

``ModelRuntime.infer`` is called from the batcher's worker thread only. On CUDA the
batch is staged in pinned host memory and copied without blocking; the forward runs
under ``torch.inference_mode()`` and returns probabilities on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.preprocess import InputLimits
from models import Checkpoint, CheckpointError, load_checkpoint

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
    return device


@dataclass
class ModelRuntime:
    checkpoint: Checkpoint
    device: torch.device

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def version(self) -> str:
        return self.checkpoint.version

    @property
    def labels(self) -> list[str]:
        return self.checkpoint.labels

    def limits(self, max_frames: int, max_pixels: int) -> InputLimits:
        spec = self.checkpoint.input
        return InputLimits(spec["height"], spec["width"], spec["channels"], spec["frames"], max_frames, max_pixels)

    @torch.inference_mode()
    def infer(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """frames: (N, C, H, W) uint8 of B clips, lengths: (B,) -> probabilities (B, K) float32 on the CPU."""
        if self.device.type == "cuda":
            frames = frames.pin_memory().to(self.device, non_blocking=True)
        logits = self.checkpoint.model(frames, lengths)
        return logits.float().softmax(dim=-1).cpu()

    def warm_up(self, max_frames: int) -> None:
        """Run a few dummy batches so first requests don't pay for lazy initialisation."""
        spec = self.checkpoint.input
        for batch, length in ((1, 1), (1, spec["frames"]), (4, min(max_frames, spec["frames"]))):
            frames = torch.zeros(batch * length, spec["channels"], spec["height"], spec["width"], dtype=torch.uint8)
            self.infer(frames, torch.full((batch,), length))

    def describe(self) -> dict[str, Any]:
        meta = self.checkpoint.metadata
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "input": meta["input"],
            "metrics": meta["metrics"],
            "arch": meta["arch"],
            "device": str(self.device),
            "created_at": meta["created_at"],
        }


def find_checkpoints(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if not found:
            raise CheckpointError(path, "folder holds no .safetensors checkpoints")
        return found
    return [path]


def load_runtimes(path: Path, device: torch.device) -> dict[str, ModelRuntime]:
    """Every checkpoint at ``path`` (a file or a folder), keyed by the name in its metadata."""
    runtimes: dict[str, ModelRuntime] = {}
    for file in find_checkpoints(path):
        ckpt = load_checkpoint(file, device=device)
        if ckpt.name in runtimes:
            raise CheckpointError(
                file, f"model name {ckpt.name!r} is already used by {runtimes[ckpt.name].checkpoint.path}"
            )
        runtimes[ckpt.name] = ModelRuntime(ckpt, device)
        log.info("loaded %s v%s from %s on %s", ckpt.name, ckpt.version, file, device)
    return runtimes
