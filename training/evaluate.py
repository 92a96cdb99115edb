"""Evaluation: run a model over a loader and compute loss, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from models import FusedClassifier

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.inference_mode()
def predict(model: FusedClassifier, batches: Iterable[Batch], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Returns (logits (M, K) float32, targets (M,)) over every clip of ``batches``."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for frames, lengths, labels in batches:
        out = model(frames.to(device, non_blocking=True), lengths)
        logits.append(out.float().cpu())
        targets.append(labels)
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def classification_metrics(logits: np.ndarray, targets: np.ndarray, num_classes: int) -> dict[str, float]:
    preds = logits.argmax(1)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    return {
        "loss": round(float(loss), 6),
        "accuracy": round(float((preds == targets).mean()), 6),
        "macro_f1": round(
            float(f1_score(targets, preds, average="macro", labels=list(range(num_classes)), zero_division=0)), 6
        ),
        "clips": len(targets),
    }


def evaluate(model: FusedClassifier, batches: Iterable[Batch], device: torch.device) -> dict[str, float]:
    logits, targets = predict(model, batches, device)
    return classification_metrics(logits, targets, model.config.num_classes)
