"""Datasets of clips: folders of frames or video files, split by subfolders or list files.

Layouts (as PyTorchVideo and MMAction2 users know them):

- frames: ``ROOT/<class>/<clip>/<frame>.{jpg,png,...}``, frames in natural order;
- videos: ``ROOT/<class>/<clip>.{mp4,avi,webm,mkv,mov}``, decoded with PyAV;
- splits: ``DATA/{train,val,test}/`` each holding such class folders, or list files
  beside the class folders (``DATA/train.txt`` or UCF101's ``trainlist01.txt``), one
  ``<relative path> [label]`` per line; the label is a class name, a 1-based index
  into ``classInd.txt``, or else the path's class folder. Without a val split, a
  seeded tenth of train is held out.

Labels come from ``DATA/classes.txt`` (one per line), ``DATA/classInd.txt``
(``<index> <name>``), or the sorted class folder names.

A clip that cannot be read (corrupt image, truncated video, empty folder) is reported
by name, skipped and counted; it never stops a run. A batch is ragged: ``frames (N, C,
H, W) uint8`` with ``lengths (B,)``, which is what ``FusedClassifier`` takes.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from media import FrameFormat, InputError, decode_image, decode_video, sample_indices, video_length

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov"}
SPLITS = ("train", "val", "test")


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
    """Labels from ``classes.txt``, ``classInd.txt``, or the sorted class folders."""
    if (root / "classes.txt").is_file():
        labels = [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    elif (root / "classInd.txt").is_file():
        rows = [line.split() for line in (root / "classInd.txt").read_text().splitlines() if line.strip()]
        labels = [name for _, name in sorted(((int(i), n) for i, n in rows), key=lambda r: r[0])]
    else:
        base = root / "train" if (root / "train").is_dir() else root
        labels = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name not in SPLITS)
    if len(labels) < 2:
        raise ValueError(f"{root}: need at least two classes, found {labels}")
    return labels


@dataclass(frozen=True)
class ClipRef:
    """One clip: a folder of frames (``frames`` listed) or a video file (``frames`` empty)."""

    path: Path
    label: int
    frames: tuple[Path, ...] = ()

    @property
    def is_video(self) -> bool:
        return not self.frames


@dataclass
class Scan:
    clips: list[ClipRef]
    problems: list[str] = field(default_factory=list)  # "<path>: <why>" for each skipped entry


def _clip_from_path(path: Path, label: int, problems: list[str]) -> ClipRef | None:
    if path.is_dir():
        frames = sorted(
            (f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=lambda f: natural_key(f.name)
        )
        if not frames:
            problems.append(f"{path}: empty clip folder (no image files)")
            return None
        return ClipRef(path, label, tuple(frames))
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        if path.stat().st_size == 0:
            problems.append(f"{path}: empty video file")
            return None
        return ClipRef(path, label)
    problems.append(f"{path}: not a clip folder or a video file")
    return None


def _scan_folders(split_dir: Path, labels: list[str]) -> Scan:
    scan = Scan([])
    for index, label in enumerate(labels):
        class_dir = split_dir / label
        if not class_dir.is_dir():
            log.warning("%s: no folder for class %r", split_dir, label)
            continue
        for entry in sorted(class_dir.iterdir(), key=lambda p: natural_key(p.name)):
            clip = _clip_from_path(entry, index, scan.problems)
            if clip is not None:
                scan.clips.append(clip)
    return scan


def list_file(root: Path, split: str) -> Path | None:
    """``root/<split>.txt``, else the first ``root/<split>*.txt`` (``trainlist01.txt``)."""
    exact = root / f"{split}.txt"
    if exact.is_file():
        return exact
    found = sorted(root.glob(f"{split}*.txt"), key=lambda p: natural_key(p.name))
    return found[0] if found else None


def _scan_list(root: Path, listing: Path, labels: list[str]) -> Scan:
    scan = Scan([])
    one_based = (root / "classInd.txt").is_file() and not (root / "classes.txt").is_file()
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        rel = parts[0]
        token = parts[1] if len(parts) > 1 else Path(rel).parts[0]
        if token in labels:
            label = labels.index(token)
        elif token.lstrip("-").isdigit():
            label = int(token) - (1 if one_based else 0)
        else:
            scan.problems.append(f"{listing}:{number}: unknown class {token!r}")
            continue
        if not 0 <= label < len(labels):
            scan.problems.append(f"{listing}:{number}: label {token} is out of range")
            continue
        path = root / rel
        if not path.exists():
            scan.problems.append(f"{path}: listed in {listing.name} but missing")
            continue
        clip = _clip_from_path(path, label, scan.problems)
        if clip is not None:
            scan.clips.append(clip)
    return scan


def scan_split(root: Path, split: str, labels: list[str], *, seed: int = 0) -> Scan:
    """Every clip of ``split``, from its subfolder or list file; val falls back to a tenth of train."""
    if (root / split).is_dir():
        return _scan_folders(root / split, labels)
    listing = list_file(root, split)
    if listing is not None:
        return _scan_list(root, listing, labels)
    if split == "val":
        train = scan_split(root, "train", labels, seed=seed)
        return Scan([c for c in train.clips if _in_val(c, seed)])
    raise FileNotFoundError(f"{root}: no {split}/ folder and no {split} list file")


def _in_val(clip: ClipRef, seed: int, fraction: float = 0.1) -> bool:
    """A stable, seeded choice of about ``fraction`` of the clips (the val split when none is given)."""
    return zlib.crc32(f"{seed}:{clip.path}".encode()) % 1000 < fraction * 1000


def has_val_split(root: Path) -> bool:
    return (root / "val").is_dir() or list_file(root, "val") is not None


class UnreadableClip(Exception):
    """A clip file or folder that could not be decoded."""


def decode_frame(path: Path, fmt: FrameFormat) -> np.ndarray:
    """One image file -> uint8 (H, W, C) at ``fmt``'s size, decoded as the server decodes an upload."""
    try:
        return decode_image(path.read_bytes(), fmt)
    except (InputError, OSError) as exc:
        raise UnreadableClip(f"{path}: {exc}") from exc


def to_clip(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) -> (T, C, H, W), contiguous: the layout batches of clips are concatenated in."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def read_video(path: Path, pick: Callable[[int], np.ndarray], fmt: FrameFormat) -> np.ndarray:
    """Decode the frames ``pick(length)`` chooses -> uint8 (T, C, H, W), seeking to far targets."""
    try:
        return to_clip(decode_video(path, fmt, pick))
    except InputError as exc:
        raise UnreadableClip(f"{path}: {exc}") from exc


# ---- dataset ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Random resized crop (the same for every frame of a clip) and horizontal flip."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    hflip: bool = True

    def __call__(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """clip: uint8 (T, C, H, W) -> same shape."""
        H, W = clip.shape[2:]
        scale = rng.uniform(*self.crop_scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h = min(H, max(1, round(H * np.sqrt(scale / ratio))))
        w = min(W, max(1, round(W * np.sqrt(scale * ratio))))
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        crop = torch.from_numpy(np.ascontiguousarray(clip[:, :, y : y + h, x : x + w])).float()
        out = torch.nn.functional.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
        result = out.round().clamp(0, 255).to(torch.uint8).numpy()
        if self.hflip and rng.random() < 0.5:
            result = result[..., ::-1]
        return np.ascontiguousarray(result)


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


Item = tuple[torch.Tensor, int, int] | Skipped


class ClipDataset(Dataset[Item]):
    """Clips of one split, decoded lazily (or preloaded into memory for small frame datasets).

    ``__getitem__`` returns ``(clip (T, C, H, W) uint8, label, index)``, or ``Skipped``
    for a clip that cannot be read, so one bad file never stops a run.
    """

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
        repeat_short: bool = False,
        augment: Augment | None = None,
        preload: bool | None = None,
        clip_offset: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.labels = labels or read_labels(self.root)
        scan = scan_split(self.root, split, self.labels, seed=seed)
        if split == "train" and not has_val_split(self.root):
            scan = Scan([c for c in scan.clips if not _in_val(c, seed)], scan.problems)
        for problem in scan.problems:
            log.warning("skipped %s", problem)
        self.problems = list(scan.problems)
        self.clips = scan.clips
        if not self.clips:
            raise ValueError(f"{self.root}: no readable clips in split {split!r}")
        self.image_size, self.channels, self.frames = image_size, channels, frames
        self.format = FrameFormat(image_size, image_size, channels)
        self.train, self.repeat_short, self.augment, self.clip_offset = train, repeat_short, augment, clip_offset
        self.rng = np.random.default_rng(seed)
        if preload is None:  # small frame datasets: decode once, keep in memory
            preload = all(not c.is_video for c in self.clips) and sum(len(c.frames) for c in self.clips) <= 200_000
        self.cache: list[np.ndarray | None] | None = None
        if preload:
            self.cache = [self._load_all(c) for c in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def cache_features(self, encode: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace every clip by its frames' features, ``encode``d once: all frames of each clip
        (T, C, H, W) uint8 -> (T, D). Clips are then sampled from their features exactly as they
        were from their frames (the same picks from the same random generator), so a head trained on
        them sees what a frozen encoder would have given it. Needs no augmentation."""
        if self.augment is not None:
            raise ValueError("cached features cannot be augmented: train without --augment")
        frames = self.cache if self.cache is not None else [self._load_all(c) for c in self.clips]
        self.cache = [None if clip is None else encode(clip) for clip in frames]

    def _load_all(self, clip: ClipRef) -> np.ndarray | None:
        if clip.is_video:
            try:
                return read_video(clip.path, np.arange, self.format)  # every frame
            except UnreadableClip as exc:
                log.warning("skipped %s", exc)
                return None
        return self._load_frames(clip)

    def _load_frames(self, clip: ClipRef) -> np.ndarray | None:
        try:
            return to_clip(np.stack([decode_frame(f, self.format) for f in clip.frames]))
        except UnreadableClip as exc:
            log.warning("skipped %s", exc)
            return None

    def _pick(self, length: int) -> np.ndarray:
        return sample_indices(
            length, self.frames, train=self.train, rng=self.rng, repeat=self.repeat_short, offset=self.clip_offset
        )

    def read(self, index: int) -> np.ndarray:
        """The sampled clip, uint8 (T, C, H, W) (its features (T, D) once cached); raises UnreadableClip."""
        clip = self.clips[index]
        if self.cache is not None:
            data = self.cache[index]
            if data is None:
                raise UnreadableClip(f"{clip.path}: a frame could not be decoded")
            return data[self._pick(len(data))]
        if clip.is_video:
            return read_video(clip.path, self._pick, self.format)
        idx = self._pick(len(clip.frames))
        return to_clip(np.stack([decode_frame(clip.frames[i], self.format) for i in idx]))

    def __getitem__(self, index: int) -> Item:
        try:
            data = self.read(index)
        except UnreadableClip as exc:
            return Skipped(str(self.clips[index].path), str(exc))
        if self.augment is not None and self.train:
            data = self.augment(data, self.rng)
        return torch.from_numpy(data), self.clips[index].label, index

    def describe(self) -> dict[str, Any]:
        """Counts per class, plus the generator's ``dataset.json`` when the folder has one."""
        counts = Counter(c.label for c in self.clips)
        info: dict[str, Any] = {
            "root": self.root.name,
            "split": self.split,
            "clips": len(self.clips),
            "kind": "video" if any(c.is_video for c in self.clips) else "frames",
            "per_class": {label: counts.get(i, 0) for i, label in enumerate(self.labels)},
            "skipped_at_scan": len(self.problems),
        }
        card = self.root / "dataset.json"
        if card.is_file():
            info["source"] = json.loads(card.read_text())
        return info


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: give each worker its own sampling stream, derived from torch's seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, ClipDataset):
        info.dataset.rng = np.random.default_rng(torch.initial_seed() % 2**32)


@dataclass
class Batch:
    frames: torch.Tensor  # (N, C, H, W) uint8
    lengths: torch.Tensor  # (B,)
    labels: torch.Tensor  # (B,)
    indices: torch.Tensor  # (B,) dataset indices
    skipped: list[Skipped]

    def pin_memory(self) -> Batch:
        self.frames = self.frames.pin_memory()
        return self


def collate_ragged(items: list[Item]) -> Batch:
    """Items -> one ragged batch; unreadable clips ride along in ``skipped``."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if not good:
        empty = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 1, 1, 1, dtype=torch.uint8), empty, empty, empty, skipped)
    clips, labels, indices = zip(*good, strict=True)
    return Batch(
        torch.cat(clips),
        torch.tensor([c.shape[0] for c in clips]),
        torch.tensor(labels),
        torch.tensor(indices),
        skipped,
    )


def scan_report(root: Path) -> dict[str, Any]:
    """Per-split, per-class counts and every unreadable or empty file, by name (``training scan``).

    Opens each clip: every frame of a frame folder, the header of each video.
    """
    root = Path(root)
    labels = read_labels(root)
    report: dict[str, Any] = {"root": str(root), "labels": labels, "splits": {}}
    for split in SPLITS:
        try:
            scan = scan_split(root, split, labels)
        except FileNotFoundError:
            continue
        problems = list(scan.problems)
        readable: Counter[str] = Counter()
        for clip in scan.clips:
            try:
                if clip.is_video:
                    if video_length(clip.path) <= 0:
                        raise UnreadableClip("no frames")
                else:
                    for f in clip.frames:
                        with Image.open(f) as img:
                            img.verify()
            except Exception as exc:  # any decoder failure means unreadable
                problems.append(f"{clip.path}: unreadable ({exc})")
                continue
            readable[labels[clip.label]] += 1
        report["splits"][split] = {"clips": sum(readable.values()), "per_class": dict(readable), "problems": problems}
    return report
