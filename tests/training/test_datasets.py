"""Dataset layouts on real files: frame folders and videos, subfolder and list-file splits, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from media import FrameFormat, sample_indices
from tests.support.media import clip_frames, write_frames, write_video
from training.data import (
    ClipDataset,
    collate_ragged,
    read_labels,
    read_video,
    scan_report,
    scan_split,
)

LABELS = ["left", "up"]


def test_video_clips_are_sampled_by_seeking(tmp_path: Path) -> None:
    # 85 frames whose brightness encodes their index (3 levels apart, more than H.264's error);
    # 4 samples about 21 frames apart, more than 2 s at 10 fps, make the reader seek.
    frames = np.stack([np.full((32, 32, 3), 3 * t, np.uint8) for t in range(85)])
    video = write_video(tmp_path / "a.mp4", frames)
    picked = sample_indices(85, 4, train=False)
    got = read_video(video, lambda n: sample_indices(n, 4, train=False), FrameFormat(32, 32, 3))  # (T, C, H, W)
    assert got.shape == (4, 3, 32, 32)
    assert [round(float(out.mean()) / 3) for out in got] == picked.tolist()  # each the frame it was sampled from


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_video_folders_with_subfolder_splits(tmp_path: Path, suffix: str) -> None:
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        for label in LABELS:
            for i in range(count):
                write_video(tmp_path / split / label / f"v{i}{suffix}", clip_frames(label, seed=i, frames=12))
    ds = ClipDataset(tmp_path, "train", image_size=24, frames=6)
    assert read_labels(tmp_path) == LABELS and len(ds) == 6 and ds.describe()["kind"] == "video"
    clip, label, _ = ds[4]
    assert clip.shape == (6, 3, 24, 24) and label == 1


def test_ucf101_style_list_files_with_class_index(tmp_path: Path) -> None:
    names = {"ApplyEyeMakeup": "left", "Archery": "up"}
    for cls, motion in names.items():
        for g in range(3):
            write_frames(tmp_path / cls / f"v_{cls}_g0{g}", clip_frames(motion, seed=g, frames=5), fmt="png")
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (tmp_path / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g00 1\nApplyEyeMakeup/v_ApplyEyeMakeup_g01 1\n"
        "Archery/v_Archery_g00 2\nArchery/v_Archery_g01 2\nArchery/v_Archery_g09 2\n"
    )
    (tmp_path / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g02\nArchery/v_Archery_g02\n")
    assert read_labels(tmp_path) == ["ApplyEyeMakeup", "Archery"]
    test = ClipDataset(tmp_path, "test", image_size=16, frames=8)
    assert [(c.path.name, c.label) for c in test.clips] == [("v_ApplyEyeMakeup_g02", 0), ("v_Archery_g02", 1)]
    # No val split: a seeded tenth of train is held out as val, and never trained on.
    labels = read_labels(tmp_path)
    for seed in range(50):  # a seed whose tenth of these four clips is not empty
        val = {c.path for c in scan_split(tmp_path, "val", labels, seed=seed).clips}
        if val:
            break
    listed = {c.path for c in scan_split(tmp_path, "train", labels, seed=seed).clips}
    assert val and val < listed
    train = ClipDataset(tmp_path, "train", image_size=16, frames=8, seed=seed)
    assert {c.path for c in train.clips} == listed - val
    assert any("v_Archery_g09: listed in trainlist01.txt but missing" in p for p in train.problems)


def test_bad_files_are_skipped_and_reported_by_name(tmp_path: Path) -> None:
    good = clip_frames("left", seed=0, frames=8)
    write_frames(tmp_path / "train" / "left" / "ok", good)
    write_video(tmp_path / "train" / "up" / "fine.mp4", clip_frames("up", seed=1, frames=8))
    broken = write_video(tmp_path / "train" / "up" / "truncated.mp4", clip_frames("up", seed=2, frames=30))
    broken.write_bytes(broken.read_bytes()[:300])
    (tmp_path / "train" / "left" / "empty").mkdir()
    corrupt = write_frames(tmp_path / "train" / "left" / "corrupt", good)
    (corrupt / "img_3.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "val").mkdir()

    report = scan_report(tmp_path)["splits"]["train"]
    problems = "\n".join(report["problems"])
    assert "empty: empty clip folder" in problems
    assert "truncated.mp4: unreadable" in problems and "corrupt: unreadable" in problems
    assert report["clips"] == 2 and report["per_class"] == {"left": 1, "up": 1}

    ds = ClipDataset(tmp_path, "train", image_size=16, frames=8, preload=False)
    batch = collate_ragged([ds[i] for i in range(len(ds))])
    assert len(batch.lengths) == 2
    assert sorted(Path(s.path).name for s in batch.skipped) == ["corrupt", "truncated.mp4"]

    out = subprocess.run(
        [sys.executable, "-m", "training", "scan", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0
    assert "truncated.mp4" in out.stdout and "corrupt" in out.stdout and "empty" in out.stdout
    assert json.loads(out.stdout.splitlines()[-1])["train"] == {"clips": 2, "problems": 3}


def test_augmentation_crops_every_frame_alike_and_keeps_shape() -> None:
    from training.data import Augment

    clip = np.stack([np.tile(np.arange(16, dtype=np.uint8)[None, None, :] * 10, (3, 16, 1))] * 4)  # (4, 3, 16, 16)
    out = Augment(hflip=False)(clip, np.random.default_rng(0))
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[0], f) for f in out)  # the same crop for every frame
    flipped = Augment(crop_scale=(1.0, 1.0))(clip, np.random.default_rng(1))
    assert np.array_equal(flipped[0], clip[0]) or np.array_equal(flipped[0], clip[0][..., ::-1])


def test_fit_on_videos_with_workers_skips_bad_files_and_records_them(tmp_path: Path) -> None:
    from models import load_checkpoint

    data = tmp_path / "videos"
    for split, count in (("train", 3), ("val", 1), ("test", 1)):
        for label in LABELS:
            for i in range(count):
                write_video(data / split / label / f"{label}{i}.mp4", clip_frames(label, seed=10 * i, frames=10))
    bad = data / "train" / "up" / "up_truncated.mp4"
    write_video(bad, clip_frames("up", seed=99, frames=30))
    bad.write_bytes(bad.read_bytes()[:400])
    corrupt = write_frames(data / "train" / "left" / "left_corrupt", clip_frames("left", seed=5, frames=6))
    (corrupt / "img_2.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "video-lstm.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "training",
        "fit",
        "--data",
        str(data),
        "--model",
        "lstm",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--frames",
        "4",
        "--image-size",
        "16",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--augment",
        "--no-hflip",
        "--repeat-short",
        "--eval-clips",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_checkpoint(out).metadata
    skipped = meta["training"]["skipped"]
    assert skipped["count"] == 2
    assert any("up_truncated.mp4" in f for f in skipped["files"]) and any("left_corrupt" in f for f in skipped["files"])
    assert "up_truncated.mp4" in proc.stderr  # reported by name while running
    assert meta["metrics"]["test"]["clips"] == 2 and meta["training"]["dataset"]["train"]["kind"] == "video"
    config = meta["training"]["config"]  # the flags reach the run, not only the config file's keys
    assert (config["augment"], config["hflip"], config["repeat_short"], config["eval_clips"]) == (True, False, True, 2)
