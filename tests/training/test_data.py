from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from media import sample_indices
from training.data import ClipDataset, collate_ragged, natural_key, read_labels
from training.fit import lr_factor


def test_natural_sort_orders_numbers_by_value() -> None:
    names = ["f10.jpg", "f2.jpg", "f1.jpg", "F3.jpg"]
    assert sorted(names, key=natural_key) == ["f1.jpg", "f2.jpg", "F3.jpg", "f10.jpg"]


def test_sample_indices_keeps_short_clips_and_segments_long_ones() -> None:
    np.testing.assert_array_equal(sample_indices(5, 8, train=False), np.arange(5))
    np.testing.assert_array_equal(sample_indices(3, 6, train=False, repeat=True), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(sample_indices(16, 4, train=False, offset=0.0), [0, 4, 8, 12])
    np.testing.assert_array_equal(sample_indices(16, 4, train=False), [2, 6, 10, 14])
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = sample_indices(16, 4, train=True, rng=rng)
        assert all(4 * i <= v < 4 * (i + 1) for i, v in enumerate(idx))


def test_lr_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0, 4, 20) == 0.25
    assert lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0
    assert abs(lr_factor(12, 4, 20) - 0.5) < 1e-9
    assert lr_factor(20, 4, 20) == 0.0


def test_frame_folder_dataset_reads_ragged_clips_in_natural_order(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for label in ("b_cls", "a_cls"):
        for clip, n in (("c1", 3), ("c2", 11)):
            d = root / "train" / label / clip
            d.mkdir(parents=True)
            for i in range(n):  # the frame's brightness encodes its index
                Image.fromarray(np.full((10, 12, 3), 20 * i, np.uint8)).save(d / f"{i}.png")
    (root / "train" / "a_cls" / "empty_clip").mkdir()
    (root / "val").mkdir()  # a val split exists, so train keeps all its clips
    assert read_labels(root) == ["a_cls", "b_cls"]
    ds = ClipDataset(root, "train", image_size=8, frames=16)
    assert len(ds) == 4  # the empty clip folder is skipped
    assert ds.problems == [f"{root / 'train' / 'a_cls' / 'empty_clip'}: empty clip folder (no image files)"]
    clip, label, index = ds[1]
    assert index == 1
    assert label == 0 and clip.shape == (11, 3, 8, 8) and clip.dtype == torch.uint8
    assert [int(f[0, 0, 0]) for f in clip] == [20 * i for i in range(11)]  # 10.png after 9.png
    batch = collate_ragged([ds[0], ds[1], ds[2]])
    assert batch.frames.shape == (17, 3, 8, 8) and batch.lengths.tolist() == [3, 11, 3]
    assert batch.labels.tolist() == [0, 0, 1] and batch.indices.tolist() == [0, 1, 2]
