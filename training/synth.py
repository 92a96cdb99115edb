"""Moving digits: a synthetic video task built from real handwriting.

Each clip shows one handwritten digit (scikit-learn's bundled 8x8 digits, no
download) moving on a noisy canvas. The eight labels come in four pairs whose clips
are each other's time reversal: a ``right`` clip is a ``left`` clip played backwards,
drawn from the same distribution of starts, ends, speeds and digits. A model that
ignores frame order sees the same set of frames for both labels of a pair, so it
cannot beat ~50% (it can still tell the pairs apart); a temporal model can reach ~100%.

Train, val and test use disjoint digit images. Generation is seeded and deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Forward motions; each partner label is the time reversal of its forward label.
PAIRS = (("left", "right"), ("up", "down"), ("clockwise", "counterclockwise"), ("zoom_in", "zoom_out"))
LABELS = ("left", "right", "up", "down", "clockwise", "counterclockwise", "zoom_in", "zoom_out")
SPLITS = ("train", "val", "test")
_FORWARD = {a: a for a, _ in PAIRS} | {b: a for a, b in PAIRS}


@dataclass(frozen=True)
class SynthConfig:
    canvas: int = 32
    min_frames: int = 8
    max_frames: int = 16
    clips_per_label: int = 400  # train; val and test get a quarter each
    seed: int = 0
    jpeg_quality: int = 90

    def clips_for(self, split: str) -> int:
        return self.clips_per_label if split == "train" else max(1, self.clips_per_label // 4)


def digit_split_indices(seed: int, count: int) -> dict[str, np.ndarray]:
    """Disjoint 60/20/20 index sets into ``count`` digit images."""
    order = np.random.default_rng(seed).permutation(count)
    a, b = int(0.6 * count), int(0.8 * count)
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def load_digit_splits(seed: int) -> dict[str, np.ndarray]:
    """sklearn's 1797 handwritten digits (8x8, 0..1), split into disjoint train/val/test sets."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    return {split: images[idx] for split, idx in digit_split_indices(seed, len(images)).items()}


def _paste(canvas: np.ndarray, digit: np.ndarray, cx: float, cy: float, size: float) -> None:
    """Draw ``digit`` scaled to ``size`` px centred at (cx, cy), clipped to the canvas."""
    s = max(2, round(size))
    img = np.asarray(Image.fromarray(digit, mode="F").resize((s, s), Image.Resampling.BILINEAR))
    x0, y0 = round(cx - s / 2), round(cy - s / 2)
    H, W = canvas.shape
    ys, xs = slice(max(0, y0), min(H, y0 + s)), slice(max(0, x0), min(W, x0 + s))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    patch = img[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    canvas[ys, xs] = np.maximum(canvas[ys, xs], patch)


def _trajectory(label: str, T: int, S: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, size) per frame for a forward motion on an S x S canvas."""
    t = np.linspace(0.0, 1.0, T)
    size = rng.uniform(0.3, 0.42) * S
    if label in ("left", "up"):
        travel = rng.uniform(0.3, 0.5) * S
        start = rng.uniform(size / 2 + travel, S - size / 2)
        along = start - travel * t
        across = np.full(T, rng.uniform(size / 2, S - size / 2))
        xs, ys = (along, across) if label == "left" else (across, along)
        return [(x, y, size) for x, y in zip(xs, ys, strict=True)]
    if label == "clockwise":  # screen y points down, so increasing angle turns clockwise
        radius = rng.uniform(0.18, 0.28) * S
        cx, cy = S / 2 + rng.uniform(-1.5, 1.5, size=2)
        theta0 = rng.uniform(0, 2 * math.pi)
        theta = theta0 + rng.uniform(0.6, 1.2) * math.pi * t
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a), size) for a in theta]
    if label == "zoom_in":
        small, big = rng.uniform(0.18, 0.28) * S, rng.uniform(0.55, 0.7) * S
        cx, cy = S / 2 + rng.uniform(-2, 2, size=2)
        return [(cx, cy, small + (big - small) * v) for v in t]
    raise ValueError(f"unknown forward motion {label!r}")


def render_clip(label: str, digit: np.ndarray, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """One clip of ``label``: uint8 (T, S, S, 3)."""
    S = cfg.canvas
    T = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    forward = _FORWARD[label]
    path = _trajectory(forward, T, S, rng)
    ink = rng.uniform(0.7, 1.0)
    background = rng.uniform(0.0, 0.25)
    noise = rng.uniform(0.02, 0.1)
    frames = np.empty((T, S, S), dtype=np.float32)
    for i, (cx, cy, size) in enumerate(path):
        canvas = np.zeros((S, S), dtype=np.float32)
        _paste(canvas, digit * ink, cx, cy, size)
        frames[i] = background + (1 - background) * canvas + rng.normal(0, noise, (S, S))
    if label != forward:
        frames = frames[::-1]
    gray = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)  # (T, S, S, 3)


def generate_split(split: str, cfg: SynthConfig, digits: np.ndarray) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (label, clip index, frames uint8 (T, S, S, 3)) for one split, deterministically."""
    split_seed = cfg.seed * 1000 + SPLITS.index(split)
    for li, label in enumerate(LABELS):
        rng = np.random.default_rng([split_seed, li])
        for ci in range(cfg.clips_for(split)):
            digit = digits[int(rng.integers(len(digits)))]
            yield label, ci, render_clip(label, digit, cfg, rng)


def write_dataset(out: str | Path, cfg: SynthConfig, splits: tuple[str, ...] = SPLITS) -> dict[str, int]:
    """Write ``out/{train,val,test}/<label>/<clip>/<frame>.jpg``; returns clips per split.

    A split's clips depend only on the config and the split, so writing one split
    alone gives the same files as writing all three.
    """
    out = Path(out)
    digit_splits = load_digit_splits(cfg.seed)
    counts = {}
    for split in splits:
        n = 0
        for label, ci, frames in generate_split(split, cfg, digit_splits[split]):
            clip_dir = out / split / label / f"clip_{ci:05d}"
            clip_dir.mkdir(parents=True, exist_ok=True)
            for fi, frame in enumerate(frames):
                Image.fromarray(frame).save(clip_dir / f"{fi:03d}.jpg", quality=cfg.jpeg_quality)
            n += 1
        counts[split] = n
        log.info("wrote %d %s clips", n, split)
    (out / "classes.txt").write_text("\n".join(LABELS) + "\n")
    info = {
        "name": "moving-digits",
        "generator": "python -m training synth",
        "config": dataclasses.asdict(cfg),
        "clips": counts,
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return counts
