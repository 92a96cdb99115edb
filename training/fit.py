"""The training loop behind ``python -m training fit``.

AdamW with a linear warm-up then cosine decay per step, gradient clipping, bf16
autocast on CUDA, seeded shuffling, best-on-validation saving, early stopping, and
resumable state. Per-epoch metrics go to a JSON-lines log; the final checkpoint holds
the best weights with their test-split metrics.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import FusedClassifier, InputSpec, build_model, load_checkpoint, profile_model, save_checkpoint
from training.config import TrainConfig
from training.data import FrameFolderDataset, collate_ragged, dataset_name, read_labels
from training.evaluate import evaluate

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    checkpoint: Path
    log_path: Path
    metrics: dict[str, Any]
    epochs_run: int
    best_epoch: int
    wall_time_s: float


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def code_revision() -> str | None:
    """The git commit of this code, with ``+dirty`` when it has uncommitted changes; None outside git."""

    def git(*args: str) -> str:
        here = Path(__file__).resolve().parent
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here, check=True)
        return proc.stdout.strip()

    try:
        rev = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":/models", ":/training"))
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}+dirty" if dirty else rev


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_loader(
    ds: FrameFolderDataset, cfg: TrainConfig, *, shuffle: bool, epoch: int, device: torch.device
) -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        generator=gen,
        collate_fn=collate_ragged,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )


def fit(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train on ``data`` (train/val/test folders) and write the best model to ``out``."""
    started = time.perf_counter()
    out = Path(out)
    log_path = Path(log_path) if log_path else out.with_suffix(".log.jsonl")
    state_path = out.with_suffix(".train-state.safetensors")
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)

    labels = read_labels(Path(data))
    common = {"image_size": cfg.image_size, "frames": cfg.frames, "labels": labels}
    train_ds = FrameFolderDataset(data, "train", train=True, seed=cfg.seed, **common)
    val_ds = FrameFolderDataset(data, "val", **common)
    log.info("train %s", train_ds.describe())

    model = build_model(cfg.model_config(len(labels))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))

    start_epoch, best = 0, {"epoch": -1, "accuracy": -1.0, "stale": 0}
    if resume is not None:
        start_epoch, best = load_train_state(Path(resume), model, optimizer, scheduler)
        log.info("resumed from %s at epoch %d", resume, start_epoch)
    elif log_path.exists():
        log_path.unlink()

    spec = InputSpec.for_model(
        model.config, frames=cfg.frames, min_frames=train_ds.min_frames, max_frames=train_ds.max_frames
    )
    training_meta = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(device),
        "dataset": {"train": train_ds.describe(), "val": val_ds.describe()},
        "code_revision": code_revision(),
    }
    name = cfg.name or out.stem
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        train_stats = train_one_epoch(
            model,
            make_loader(train_ds, cfg, shuffle=True, epoch=epoch, device=device),
            optimizer,
            scheduler,
            cfg,
            device,
            autocast,
            epoch,
            progress,
        )
        val = evaluate(model, make_loader(val_ds, cfg, shuffle=False, epoch=0, device=device), device)
        record = {
            "epoch": epoch + 1,
            "lr": scheduler.get_last_lr()[0],
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("epoch %d: %s", epoch + 1, record)
        if val["accuracy"] > best["accuracy"]:
            best = {"epoch": epoch + 1, "accuracy": val["accuracy"], "stale": 0}
            save_checkpoint(
                out,
                model,
                name=name,
                version=cfg.version,
                labels=labels,
                input_spec=spec,
                metrics={"val": val},
                training=training_meta,
            )
        else:
            best["stale"] += 1
        save_train_state(state_path, model, optimizer, scheduler, epoch + 1, best)
        epochs_done = epoch + 1
        if best["stale"] >= cfg.patience:
            log.info("early stop: no better val accuracy for %d epochs", cfg.patience)
            break

    return finish(data, out, cfg, device, labels, log_path, epochs_done - start_epoch, best, started)


def train_one_epoch(
    model: FusedClassifier,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    autocast: torch.autocast,
    epoch: int,
    progress: bool | None,
) -> dict[str, float]:
    model.train()
    seen, correct, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
    bar = tqdm(
        loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if progress is None else not progress, leave=False
    )
    for frames, lengths, labels in bar:
        frames, labels = frames.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(frames, lengths)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        seen += n
        loss_sum += loss.item() * n
        correct += int((logits.argmax(1) == labels).sum())
        bar.set_postfix(
            loss=f"{loss_sum / seen:.3f}",
            acc=f"{correct / seen:.3f}",
            clips_s=f"{seen / (time.perf_counter() - t0):.0f}",
        )
    elapsed = time.perf_counter() - t0
    return {
        "loss": round(loss_sum / seen, 6),
        "accuracy": round(correct / seen, 6),
        "clips_per_s": round(seen / elapsed, 1),
    }


def finish(
    data: str | Path,
    out: Path,
    cfg: TrainConfig,
    device: torch.device,
    labels: list[str],
    log_path: Path,
    epochs_run: int,
    best: dict[str, Any],
    started: float,
) -> FitResult:
    """Reload the best weights, measure them on the test split, and store that in the checkpoint."""
    ckpt = load_checkpoint(out, device=device)
    test_ds = FrameFolderDataset(data, "test", image_size=cfg.image_size, frames=cfg.frames, labels=labels)
    test = evaluate(ckpt.model, make_loader(test_ds, cfg, shuffle=False, epoch=0, device=device), device)
    test.update(split="test", dataset=dataset_name(Path(data)))
    wall = round(time.perf_counter() - started, 1)
    meta = ckpt.metadata
    meta["training"].update(
        best_epoch=best["epoch"],
        epochs_run=epochs_run,
        wall_time_s=wall,
        profile=profile_model(ckpt.model, cfg.frames).to_dict(),
    )
    meta["training"]["dataset"]["test"] = test_ds.describe()
    metrics = {"test": test, **meta["metrics"]}
    save_checkpoint(
        out,
        ckpt.model,
        name=meta["name"],
        version=meta["version"],
        labels=labels,
        input_spec=InputSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["input"].items()}),
        metrics=metrics,
        training=meta["training"],
    )
    log.info("test: %s", test)
    return FitResult(out, log_path, metrics, epochs_run, best["epoch"], wall)


def save_train_state(
    path: Path,
    model: FusedClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    best: dict[str, Any],
) -> None:
    """Everything needed to resume, as safetensors (tensors) + JSON (the rest); no pickle."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": epoch, "best": best, "param_groups": opt["param_groups"], "scheduler": scheduler.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"fusionserve_train_state": json.dumps(meta)})
    tmp.replace(path)


def load_train_state(
    path: Path,
    model: FusedClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("fusionserve_train_state")
        if raw is None:
            raise ValueError(f"{path}: not a fusionserve training state file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(raw)
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]), dict(meta["best"])
