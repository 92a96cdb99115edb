"""Datasets of clips stored as folders of frames.

Layout: ``DATA/<split>/<class>/<clip>/<frame>.{jpg,jpeg,png,webp,bmp}``, frames in
natural order (``2.jpg`` before ``10.jpg``). Labels are the lines of
``DATA/classes.txt`` when it exists, else the sorted class folder names.

A batch is ragged: ``frames (N, C, H, W) uint8`` (all clips' frames concatenated),
``lengths (B,)`` and ``labels (B,)``, which is what ``FusedClassifier`` takes.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def natural_key(name: str) -> list[object]:
    """Sort key that orders embedded numbers by value: ``f2`` < ``f10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def dataset_name(root: Path) -> str:
    """The ``name`` in ``root/dataset.json`` when a generator wrote one, else the folder name."""
    card = root / "dataset.json"
    if card.is_file():
        return str(json.loads(card.read_text()).get("name", root.name))
    return root.resolve().name


def read_labels(root: Path) -> list[str]:
    """Labels from ``root/classes.txt`` if present, else sorted class folders of the train split."""
    listing = root / "classes.txt"
    if listing.is_file():
        labels = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:
        base = root / "train" if (root / "train").is_dir() else root
        labels = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(labels) < 2:
        raise ValueError(f"{root}: need at least two classes, found {labels}")
    return labels


@dataclass(frozen=True)
class ClipRef:
    path: Path
    label: int
    frames: tuple[Path, ...]


def scan_split(root: Path, split: str, labels: list[str]) -> list[ClipRef]:
    """Every clip folder under ``root/split/<class>/``; empty clips are skipped with a warning."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such split folder")
    clips = []
    for label_idx, label in enumerate(labels):
        class_dir = split_dir / label
        if not class_dir.is_dir():
            log.warning("%s: no folder for class %r", split_dir, label)
            continue
        for clip_dir in sorted((p for p in class_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
            frames = sorted(
                (f for f in clip_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda f: natural_key(f.name),
            )
            if not frames:
                log.warning("%s: no frames, skipped", clip_dir)
                continue
            clips.append(ClipRef(clip_dir, label_idx, tuple(frames)))
    return clips


def sample_indices(length: int, frames: int, *, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick at most ``frames`` frame indices: all of a short clip, else one per equal segment.

    Training takes a random offset in each segment, evaluation the segment's centre (TSN).
    """
    if length <= frames:
        return np.arange(length)
    edges = np.linspace(0, length, frames + 1)
    if train:
        rng = rng or np.random.default_rng()
        picks = edges[:-1] + rng.random(frames) * (edges[1:] - edges[:-1])
    else:
        picks = (edges[:-1] + edges[1:]) / 2
    return np.minimum(picks.astype(np.int64), length - 1)


def decode_frame(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 (C, size, size)."""
    with Image.open(path) as img:
        img.draft("RGB" if channels == 3 else "L", (size, size))  # JPEG: decode at reduced scale
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class FrameFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """Clips of one split, decoded once into memory (the synthetic task is small)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_size: int,
        frames: int,
        channels: int = 3,
        train: bool = False,
        labels: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.labels = labels or read_labels(self.root)
        self.clips = scan_split(self.root, split, self.labels)
        if not self.clips:
            raise ValueError(f"{self.root / split}: no clips found")
        self.frames, self.train = frames, train
        self.rng = np.random.default_rng(seed)
        self.data = [
            np.stack([decode_frame(f, image_size, channels) for f in clip.frames]) for clip in self.clips
        ]  # each (T, C, H, W) uint8
        lengths = [len(c.frames) for c in self.clips]
        self.min_frames, self.max_frames = min(lengths), max(lengths)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        clip = self.data[index]
        idx = sample_indices(len(clip), self.frames, train=self.train, rng=self.rng)
        return torch.from_numpy(clip[idx]), self.clips[index].label  # (T, C, H, W) uint8

    def describe(self) -> dict[str, object]:
        """Counts per class, plus the generator's ``dataset.json`` when the folder has one."""
        counts = np.bincount([c.label for c in self.clips], minlength=len(self.labels))
        info: dict[str, object] = {
            "root": self.root.name,
            "clips": len(self.clips),
            "per_class": dict(zip(self.labels, counts.tolist(), strict=True)),
        }
        card = self.root / "dataset.json"
        if card.is_file():
            info["source"] = json.loads(card.read_text())
        return info


def collate_ragged(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(clip (T_i, C, H, W), label)] -> frames (sum T_i, C, H, W), lengths (B,), labels (B,)."""
    clips, labels = zip(*batch, strict=True)
    lengths = torch.tensor([c.shape[0] for c in clips], dtype=torch.long)
    return torch.cat(clips), lengths, torch.tensor(labels, dtype=torch.long)
