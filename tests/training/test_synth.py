"""Moving digits: labels, reversal pairs, determinism, disjoint digits, the files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.cli import main
from training.synth import (
    LABELS,
    PAIRS,
    SPLITS,
    SynthConfig,
    digit_split_indices,
    generate_split,
    load_digit_splits,
    render_clip,
)

CFG = SynthConfig(canvas=24, min_frames=5, max_frames=9, clips_per_label=3, seed=3)


def test_exactly_the_eight_labels_in_four_reversal_pairs() -> None:
    assert LABELS == ("left", "right", "up", "down", "clockwise", "counterclockwise", "zoom_in", "zoom_out")
    assert sorted(label for pair in PAIRS for label in pair) == sorted(LABELS)


@pytest.mark.parametrize("forward,backward", PAIRS)
def test_partner_clip_is_the_exact_time_reversal(forward: str, backward: str) -> None:
    digit = load_digit_splits(0)["train"][5]
    a = render_clip(forward, digit, CFG, np.random.default_rng(11))
    b = render_clip(backward, digit, CFG, np.random.default_rng(11))
    assert a.shape == b.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a[::-1], b)
    assert not np.array_equal(a, b)


def test_motions_move_the_digit_the_way_their_label_says() -> None:
    digit = load_digit_splits(0)["train"][0]
    clean = SynthConfig(canvas=32, min_frames=10, max_frames=10)

    def centroid_and_mass(frame: np.ndarray) -> tuple[float, float, float]:
        ink = np.clip(frame[..., 0].astype(float) - np.median(frame[..., 0]) - 40, 0, None)
        ys, xs = np.indices(ink.shape)
        return (xs * ink).sum() / ink.sum(), (ys * ink).sum() / ink.sum(), float((ink > 0).sum())

    def first_last(label: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        clip = render_clip(label, digit, clean, np.random.default_rng(1))
        return centroid_and_mass(clip[0]), centroid_and_mass(clip[-1])

    (x0, _, _), (x1, _, _) = first_last("left")
    assert x1 < x0 - 4
    (_, y0, _), (_, y1, _) = first_last("down")
    assert y1 > y0 + 4
    (_, _, m0), (_, _, m1) = first_last("zoom_in")
    assert m1 > 2 * m0


def test_generation_is_deterministic_and_lengths_in_range() -> None:
    digits = load_digit_splits(CFG.seed)["val"]
    a = list(generate_split("val", CFG, digits))
    b = list(generate_split("val", CFG, digits))
    assert len(a) == len(LABELS) * CFG.clips_for("val")
    for (la, ia, fa), (lb, ib, fb) in zip(a, b, strict=True):
        assert (la, ia) == (lb, ib)
        np.testing.assert_array_equal(fa, fb)
        assert CFG.min_frames <= len(fa) <= CFG.max_frames
        assert fa.shape[1:] == (CFG.canvas, CFG.canvas, 3)


def test_splits_use_disjoint_digit_images() -> None:
    idx = digit_split_indices(0, 1797)
    sets = {s: set(idx[s].tolist()) for s in SPLITS}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == 1797


def test_synth_cli_writes_jpeg_folders(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--clips-per-label",
                "2",
                "--canvas",
                "20",
                "--min-frames",
                "3",
                "--max-frames",
                "4",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert (out / "classes.txt").read_text().split() == list(LABELS)
    for split, per_label in (("train", 2), ("val", 1), ("test", 1)):
        for label in LABELS:
            clips = sorted((out / split / label).iterdir())
            assert len(clips) == per_label
            frames = sorted(clips[0].glob("*.jpg"))
            assert 3 <= len(frames) <= 4
            with Image.open(frames[0]) as img:
                assert img.format == "JPEG" and img.size == (20, 20)
