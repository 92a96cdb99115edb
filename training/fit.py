"""The training loop behind ``python -m training fit``, on one process or under ``torchrun``.

AdamW with a linear warm-up then cosine decay per step, gradient clipping, bf16
autocast on CUDA, seeded shuffling, best-on-validation saving, early stopping, and
resumable state. Per-epoch metrics go to a JSON-lines log; the final checkpoint holds
the best weights with their test-split metrics.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains on its shard of the train
split (DistributedSampler) with gradients averaged by DDP (gloo on CPU, NCCL on CUDA);
validation and test predictions of all ranks are gathered, so metrics cover every clip
exactly once; rank 0 alone logs and saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from host.device import pick_device
from models import FusedClassifier, InputSpec, build_model, load_checkpoint, profile_model, save_checkpoint
from models.backbones import Backbone, load_weights, published_weights
from training.config import TrainConfig
from training.data import Augment, Batch, ClipDataset, collate_ragged, dataset_name, read_labels, seed_worker
from training.evaluate import Predictions, classification_metrics, predict

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    checkpoint: Path
    log_path: Path
    metrics: dict[str, Any]
    epochs_run: int
    best_epoch: int
    wall_time_s: float
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun group when ``WORLD_SIZE`` > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


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
    ds: ClipDataset, cfg: TrainConfig, rank: Dist, *, shuffle: bool, epoch: int, device: torch.device
) -> DataLoader[Any]:
    """A loader for one epoch. Single process: a seeded shuffle. Under DDP (or with workers): a sampler."""
    sampler = None
    if rank.active or cfg.workers > 0:
        sampler = DistributedSampler(ds, num_replicas=rank.world, rank=rank.rank, shuffle=shuffle, seed=cfg.seed)
        sampler.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=gen,
        collate_fn=collate_ragged,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=seed_worker,
        persistent_workers=cfg.workers > 0,
    )


class EpochLoaders:
    """Loaders per dataset; with worker processes one is kept for the whole run (persistent
    workers, each seeded by ``seed_worker``) and only its sampler is reseeded each epoch."""

    def __init__(self, cfg: TrainConfig, rank: Dist, device: torch.device) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self._kept: dict[tuple[int, bool], tuple[ClipDataset, DataLoader[Any]]] = {}

    def __call__(self, ds: ClipDataset, *, shuffle: bool, epoch: int = 0) -> DataLoader[Any]:
        kept = self._kept.get((id(ds), shuffle))
        if kept is not None:
            loader = kept[1]
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            return loader
        loader = make_loader(ds, self.cfg, self.rank, shuffle=shuffle, epoch=epoch, device=self.device)
        if self.cfg.workers > 0:
            self._kept[(id(ds), shuffle)] = (ds, loader)  # holding ds keeps its id unique
        return loader


def gather_predictions(pred: Predictions, rank: Dist) -> tuple[Predictions, list[int]]:
    """All ranks' predictions, each dataset clip once (DistributedSampler pads shards), and clips per rank."""
    if not rank.active:
        return pred, [len(pred.targets)]
    parts: list[Any] = [None] * rank.world
    dist.all_gather_object(parts, (pred.logits, pred.targets, pred.indices, pred.skipped))
    seen: dict[int, tuple[np.ndarray, int]] = {}
    skipped = []
    for logits, targets, indices, skip in parts:
        skipped += skip
        for row, target, index in zip(logits, targets, indices, strict=True):
            seen.setdefault(int(index), (row, int(target)))
    order = sorted(seen)
    merged = Predictions(
        np.stack([seen[i][0] for i in order]),
        np.array([seen[i][1] for i in order]),
        np.array(order),
        sorted(set(skipped), key=lambda s: s.path),
    )
    return merged, [len(p[1]) for p in parts]


def measure(
    model: torch.nn.Module, ds: ClipDataset, loaders: EpochLoaders, num_classes: int
) -> tuple[dict[str, Any], list[str]]:
    """Metrics over every clip of ``ds`` (all ranks' shards), and the unreadable clips met."""
    cfg, rank, device = loaders.cfg, loaders.rank, loaders.device
    runs = []
    for k in range(cfg.eval_clips):  # multi-clip evaluation: shifted segment positions, averaged logits
        ds.clip_offset = None if cfg.eval_clips == 1 else (k + 0.5) / cfg.eval_clips
        local = predict(model, loaders(ds, shuffle=False), device)
        runs.append(gather_predictions(local, rank))
    ds.clip_offset = None
    pred, per_rank = runs[0]
    logits = np.mean([p.logits for p, _ in runs], axis=0) if len(runs) > 1 else pred.logits
    metrics = classification_metrics(logits, pred.targets, num_classes)
    if rank.active:
        metrics["clips_per_rank"] = per_rank
    return metrics, sorted({s.path for s in pred.skipped})


def batches(loader: DataLoader[Any], desc: str, show: bool) -> Iterator[Batch]:
    yield from tqdm(loader, desc=desc, disable=not show, leave=False)


def build_datasets(
    data: Path, cfg: TrainConfig, labels: list[str], image_size: int
) -> tuple[ClipDataset, ClipDataset, ClipDataset]:
    """Train (augmented when asked), val and test at ``image_size``: all three opened before training
    starts, so a missing split fails the run at once instead of after its last epoch."""
    common: dict[str, Any] = {
        "image_size": image_size,
        "frames": cfg.frames,
        "labels": labels,
        "repeat_short": cfg.repeat_short,
        "seed": cfg.seed,
        "preload": cfg.preload,
    }
    augment = Augment(hflip=cfg.hflip) if cfg.augment else None
    train = ClipDataset(data, "train", train=True, augment=augment, **common)
    return train, ClipDataset(data, "val", **common), ClipDataset(data, "test", **common)


class FeatureHead(torch.nn.Module):
    """The classifier's head alone: cached encoder features (N, D) and lengths (B,) -> logits (B, K)."""

    def __init__(self, model: FusedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.classify_features(feats, lengths)


def encoder_features(model: FusedClassifier, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """What caches a clip's features: all its frames (T, C, H, W) uint8 -> (T, D) float32, through the
    frozen encoder as training runs it (bf16 autocast on CUDA)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    @torch.no_grad()
    def encode(clip: np.ndarray) -> np.ndarray:
        with autocast:
            feats = model.forward_features(torch.from_numpy(clip).to(device))
        return feats.float().cpu().numpy()  # type: ignore[no-any-return]

    return encode


def param_groups(model: FusedClassifier, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The encoder's parameters at ``lr * encoder_lr_mult``, the rest at ``lr``."""
    encoder = list(model.encoder.parameters())
    own = {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in own]
    return [{"params": rest}, {"params": encoder, "lr": cfg.lr * cfg.encoder_lr_mult}]


def start_encoder(model: FusedClassifier, pretrained: str) -> None:
    """Load the backbone's starting weights: ``hub`` (the library's published ones, downloaded) or a
    .safetensors file of its state dict; a file that does not fit names its keys."""
    encoder = model.encoder
    if not isinstance(encoder, Backbone):
        raise ValueError("--pretrained needs a timm or torchvision --encoder")
    if pretrained == "hub":
        load_weights(encoder, published_weights(encoder), f"{encoder.source}'s published weights")
        return
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    load_weights(encoder, load_file(str(path)), str(path))
    log.info("encoder %s:%s starts from %s", encoder.source, encoder.model_name, path)


def fit(
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    log_path: str | Path | None = None,
    progress: bool | None = None,
) -> FitResult:
    """Train on ``data`` and write the best model to ``out`` (rank 0 writes; every rank returns)."""
    started = time.perf_counter()
    run = Run(Path(data), Path(out), cfg, Path(log_path) if log_path else None, progress)
    if resume is not None:
        run.resume(Path(resume))
    elif run.rank.main and run.log_path.exists():
        run.log_path.unlink()
    epochs_done = run.start_epoch
    for epoch in range(run.start_epoch, cfg.epochs):
        stop = run.epoch(epoch)
        epochs_done = epoch + 1
        if stop:
            log.info("early stop: no better val accuracy for %d epochs", cfg.patience)
            break
    if run.rank.active:
        dist.barrier()  # rank 0's checkpoint is on disk before anyone reads it
    return finish(run, epochs_done - run.start_epoch, started)


class Run:
    """One training run: its datasets, model, optimiser and schedule, and the best epoch so far."""

    def __init__(self, data: Path, out: Path, cfg: TrainConfig, log_path: Path | None, progress: bool | None) -> None:
        self.data, self.out, self.cfg = data, out, cfg
        self.log_path = log_path or out.with_suffix(".log.jsonl")
        self.state_path = out.with_suffix(".train-state.safetensors")
        self.rank, self.device = init_distributed(cfg.device)
        seed_everything(cfg.seed)
        self.show = self.rank.main and (progress if progress is not None else bool(os.isatty(2)))
        self.labels = read_labels(data)
        config = cfg.model_config(len(self.labels))
        self.train_ds, self.val_ds, self.test_ds = build_datasets(data, cfg, self.labels, config.image_size)
        if self.rank.main:
            log.info("train %s", self.train_ds.describe())
        self.model = build_model(config)
        if cfg.pretrained is not None:
            start_encoder(self.model, cfg.pretrained)
        self.model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(self.train_ds) / (cfg.batch_size * self.rank.world))
        total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, warmup, total))
        self.trained: torch.nn.Module = self.model
        if cfg.cache_features:  # the encoder once per frame now; then the head alone, on its features
            self.model.freeze_encoder(True)
            encode = encoder_features(self.model, self.device)
            self.train_ds.cache_features(encode)
            self.val_ds.cache_features(encode)
            self.trained = FeatureHead(self.model)
        if self.rank.active:  # a frozen encoder's parameters get no gradient in some epochs
            self.trained = DistributedDataParallel(self.trained, find_unused_parameters=cfg.freeze_encoder > 0)
        self.loaders = EpochLoaders(cfg, self.rank, self.device)
        self.start_epoch, self.best = 0, {"epoch": -1, "accuracy": -1.0, "stale": 0}
        self.skipped: set[str] = set(self.train_ds.problems) | set(self.val_ds.problems)
        self.spec, self.meta = self._spec(), self._meta()

    def _spec(self) -> InputSpec:
        cfg = self.cfg
        lengths = [len(c.frames) for c in self.train_ds.clips if not c.is_video] or [cfg.frames]
        longest = min(max(lengths), cfg.frames) if not cfg.repeat_short else cfg.frames
        return InputSpec.for_model(self.model.config, frames=cfg.frames, min_frames=min(lengths), max_frames=longest)

    def _meta(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "device": str(self.device),
            "world_size": self.rank.world,
            "dataset": {"train": self.train_ds.describe(), "val": self.val_ds.describe()},
            "code_revision": code_revision(),
            "pretrained": self.cfg.pretrained,
            "encoder_frozen_epochs": min(self.cfg.freeze_encoder, self.cfg.epochs),
            "features_cached": self.cfg.cache_features,
        }

    def resume(self, state: Path) -> None:
        self.start_epoch, self.best = load_train_state(state, self.model, self.optimizer, self.scheduler)
        log.info("resumed from %s at epoch %d", state, self.start_epoch)

    def epoch(self, epoch: int) -> bool:
        """Train one epoch, validate, keep the best; True when validation has stopped improving."""
        cfg = self.cfg
        self.model.freeze_encoder(epoch < cfg.freeze_encoder)
        loader = self.loaders(self.train_ds, shuffle=True, epoch=epoch)
        bar = batches(loader, f"epoch {epoch + 1}/{cfg.epochs}", self.show)
        stats, bad = train_one_epoch(self.trained, self.optimizer, self.scheduler, cfg, self.device, self.rank, bar)
        val, val_bad = measure(self.trained, self.val_ds, self.loaders, len(self.labels))
        self.skipped |= set(bad) | set(val_bad)
        record = {
            "epoch": epoch + 1,
            "lr": self.scheduler.get_last_lr()[0],
            **{f"train_{k}": v for k, v in stats.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        if val["accuracy"] > self.best["accuracy"]:
            self.best = {"epoch": epoch + 1, "accuracy": val["accuracy"], "stale": 0}
            if self.rank.main:
                self.save(self.model, {"val": val}, self.meta)
        else:
            self.best["stale"] += 1
        if self.rank.main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", epoch + 1, record)
            save_train_state(self.state_path, self.model, self.optimizer, self.scheduler, epoch + 1, self.best)
        return bool(self.best["stale"] >= cfg.patience)

    def save(self, model: FusedClassifier, metrics: dict[str, Any], training: dict[str, Any]) -> None:
        name = self.cfg.name or self.out.stem
        save_checkpoint(
            self.out,
            model,
            name=name,
            version=self.cfg.version,
            labels=self.labels,
            input_spec=self.spec,
            metrics=metrics,
            training=training,
        )


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    device: torch.device,
    rank: Dist,
    bar: Iterator[Batch],
) -> tuple[dict[str, float], list[str]]:
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    sums = torch.zeros(3, dtype=torch.float64)  # clips, correct, loss * clips
    skipped: list[str] = []
    t0 = time.perf_counter()
    for batch in bar:
        skipped += [f"{s.path}: {s.reason}" for s in batch.skipped]
        optimizer.zero_grad(set_to_none=True)
        if len(batch.lengths) == 0:  # every clip unreadable: a zero step keeps DDP ranks in lockstep
            sum(p.sum() * 0.0 for p in model.parameters()).backward()  # type: ignore[union-attr]
            optimizer.step()
            scheduler.step()
            continue
        frames, labels = batch.frames.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
        with autocast:
            logits = model(frames, batch.lengths)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        sums += torch.tensor([n, int((logits.argmax(1) == labels).sum()), loss.item() * n], dtype=torch.float64)
        if isinstance(bar, tqdm):
            clips_s = f"{sums[0] / (time.perf_counter() - t0):.0f}"
            bar.set_postfix(loss=f"{sums[2] / sums[0]:.3f}", acc=f"{sums[1] / sums[0]:.3f}", clips_s=clips_s)
    for line in skipped:
        log.warning("skipped %s", line)
    return epoch_stats(sums, time.perf_counter() - t0, rank), skipped


def epoch_stats(sums: torch.Tensor, elapsed: float, rank: Dist) -> dict[str, float]:
    """Loss, accuracy, clips and clips/s of an epoch from its (clips, correct, loss * clips) sums."""
    if rank.active:
        dist.all_reduce(sums)  # every rank's clips count
    seen = max(1.0, float(sums[0]))
    return {
        "loss": round(float(sums[2]) / seen, 6),
        "accuracy": round(float(sums[1]) / seen, 6),
        "clips": int(sums[0]),
        "clips_per_s": round(seen / elapsed, 1),
    }


def finish(run: Run, epochs_run: int, started: float) -> FitResult:
    """Reload the best weights, measure them on the test split (all ranks), store that in the checkpoint."""
    ckpt = load_checkpoint(run.out, device=run.device)
    test, test_bad = measure(ckpt.model, run.test_ds, run.loaders, len(run.labels))
    test.update(split="test", dataset=dataset_name(run.data))
    skipped = sorted(run.skipped | set(test_bad) | set(run.test_ds.problems))
    wall = round(time.perf_counter() - started, 1)
    meta = ckpt.metadata
    metrics = {"test": test, **meta["metrics"]}
    if run.rank.main:
        meta["training"].update(
            best_epoch=run.best["epoch"],
            epochs_run=epochs_run,
            wall_time_s=wall,
            profile=profile_model(ckpt.model, run.cfg.frames).to_dict(),
            skipped={"count": len(skipped), "files": skipped[:100]},
        )
        meta["training"]["dataset"]["test"] = run.test_ds.describe()
        run.save(ckpt.model, metrics, meta["training"])
        log.info("test: %s", test)
        if skipped:
            log.warning("%d unreadable clips were skipped: %s", len(skipped), "; ".join(skipped[:10]))
    if run.rank.active:
        dist.barrier()
    return FitResult(run.out, run.log_path, metrics, epochs_run, run.best["epoch"], wall, skipped)


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
