"""Evaluation: predictions over a dataset, metrics, and the ``evaluate`` report with its plots."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from models import FusedClassifier
from training.data import Batch, Skipped

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    logits: np.ndarray  # (M, K) float32
    targets: np.ndarray  # (M,)
    indices: np.ndarray  # (M,) dataset indices
    skipped: list[Skipped] = field(default_factory=list)


@torch.inference_mode()
def predict(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device) -> Predictions:
    """Run ``model`` (a FusedClassifier, maybe DDP-wrapped) over ``batches`` in eval mode."""
    was_training = model.training
    model.eval()
    logits, targets, indices, skipped = [], [], [], []
    for batch in batches:
        skipped += batch.skipped
        if len(batch.lengths) == 0:
            continue
        out = model(batch.frames.to(device, non_blocking=True), batch.lengths)
        logits.append(out.float().cpu())
        targets.append(batch.labels)
        indices.append(batch.indices)
    model.train(was_training)
    if not logits:
        return Predictions(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64), skipped)
    return Predictions(torch.cat(logits).numpy(), torch.cat(targets).numpy(), torch.cat(indices).numpy(), skipped)


def classification_metrics(logits: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, macro-F1 and clip count: what training logs and checkpoints record."""
    preds = logits.argmax(1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    f1 = f1_score(targets, preds, average="macro", labels=list(range(num_classes)), zero_division=0)
    return {
        "loss": round(float(loss), 6),
        "accuracy": round(float((preds == targets).mean()), 6),
        "macro_f1": round(float(f1), 6),
        "clips": len(targets),
    }


def full_report(logits: np.ndarray, targets: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, top-5, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    K = len(labels)
    report = classification_metrics(logits, targets, K)
    top = np.argsort(-logits, axis=1)[:, : min(5, K)]
    report["top5_accuracy"] = round(float((top == targets[:, None]).any(1).mean()), 6)
    preds = logits.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=list(range(K)), zero_division=0
    )
    report["per_class"] = {
        label: {
            "precision": round(float(p), 6),
            "recall": round(float(r), 6),
            "f1": round(float(f), 6),
            "support": int(s),
        }
        for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
    }
    report["confusion_matrix"] = {
        "labels": labels,
        "rows": "true",
        "columns": "predicted",
        "counts": confusion_matrix(targets, preds, labels=list(range(K))).tolist(),
    }
    return report


def evaluate(model: FusedClassifier, batches: Iterable[Batch], device: torch.device) -> dict[str, Any]:
    pred = predict(model, batches, device)
    return classification_metrics(pred.logits, pred.targets, model.config.num_classes)


def plot_confusion(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion_matrix"]["counts"])
    labels = report["confusion_matrix"]["labels"]
    size = max(4.0, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}")
    if len(labels) <= 30:
        for (i, j), value in np.ndenumerate(cm):
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > cm.max() / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_curves(log_path: Path, out: Path) -> Path:
    """Training and validation loss and accuracy per epoch, from a ``fit`` JSON-lines log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], marker="o", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(report: dict[str, Any], out_dir: Path, log_path: Path | None) -> list[Path]:
    """report.json, and with matplotlib installed confusion.png and (given the run's log) curves.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no confusion.png or curves.png")
        return written
    written.append(plot_confusion(report, out_dir / "confusion.png"))
    if log_path is not None and log_path.is_file():
        written.append(plot_curves(log_path, out_dir / "curves.png"))
    else:
        log.warning("no training log at %s: no curves.png", log_path)
    return written
