"""Evaluation numbers against a hand-computed confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import full_report


def one_hot_logits(preds: list[int], k: int) -> np.ndarray:
    logits = np.zeros((len(preds), k), np.float32)
    logits[np.arange(len(preds)), preds] = 5.0
    return logits


def test_report_matches_a_hand_computed_confusion_matrix() -> None:
    targets = np.array([0, 0, 1, 1, 2, 2])
    preds = [0, 1, 1, 1, 2, 0]
    report = full_report(one_hot_logits(preds, 3), targets, ["a", "b", "c"])
    # rows: true a, b, c; columns: predicted a, b, c
    assert report["confusion_matrix"]["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    per = report["per_class"]
    assert (per["a"]["precision"], per["a"]["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (per["b"]["precision"], per["b"]["recall"]) == (pytest.approx(2 / 3, abs=1e-6), pytest.approx(1.0))
    assert (per["c"]["precision"], per["c"]["recall"]) == (pytest.approx(1.0), pytest.approx(1 / 2))
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert report["macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-6)
    assert [per[k]["support"] for k in "abc"] == [2, 2, 2]
    assert report["top5_accuracy"] == 1.0  # three classes: the true one is always in the top five
    assert report["clips"] == 6


def test_top5_counts_a_hit_anywhere_in_the_five_best() -> None:
    logits = np.array([[9, 8, 7, 6, 5, 4, 3.0], [0, 1, 2, 3, 4, 5, 6.0]], np.float32)
    report = full_report(logits, np.array([4, 1]), [str(i) for i in range(7)])
    assert report["accuracy"] == 0.0
    assert report["top5_accuracy"] == 0.5  # clip 0's class 4 is 5th best; clip 1's class 1 is 6th
