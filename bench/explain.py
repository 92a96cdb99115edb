"""Faithfulness of ``explain=frames``: does leaving out the frames it ranks first hurt the answer more
than leaving out frames at random?

``python -m bench explain`` takes each bundled checkpoint (or ``--checkpoint FILE`` ...), regenerates
the moving-digits test split it was measured on (from the checkpoint's own record of its dataset,
under build/; ``--data DIR`` takes a folder instead), and for every test clip: explains it
(``models.explain.occlusion``, as the server does), removes the ``--k`` frames of highest importance
and measures how far the predicted label's probability falls, then does the same with ``--k`` frames
drawn at random (``--draws`` draws per clip, averaged). The report gives both mean drops, how often
the top-k drop is the larger, and the accuracy of the clips left after each removal; and what an
explanation costs against a plain forward pass of the same clip (medians over the clips of the
model's length, one clip at a time, in this process).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.serve import machine
from bench.serve import write_outputs as write_json
from models import bundled_checkpoints, load_checkpoint, read_metadata
from models.classifier import FusedClassifier
from models.explain import occlusion
from training.data import ClipDataset
from training.synth import SynthConfig, write_dataset


def test_split(checkpoint: Path, folder: Path = Path("build")) -> Path:
    """The moving-digits test split ``checkpoint`` was measured on, written once under ``folder``."""
    source = read_metadata(checkpoint)["training"]["dataset"]["train"]["source"]
    config = SynthConfig(**source["config"])
    root = folder / f"explain-moving-digits-seed{config.seed}"
    if not (root / "test").is_dir():
        write_dataset(root, config, splits=("test",))
    return root


@torch.no_grad()
def removal_drops(
    model: FusedClassifier, frames: torch.Tensor, k: int, draws: int, rng: np.random.Generator
) -> dict[str, Any]:
    """One clip (T, C, H, W): the predicted label's probability, and after removing its top-``k`` frames
    and ``k`` random frames (mean of ``draws``), with the labels predicted then."""
    explained = occlusion(model, frames)
    T = frames.shape[0]
    predicted = int(explained.probabilities.argmax())
    top = set(explained.importance.topk(k).indices.tolist())
    keeps = [[i for i in range(T) if i not in top]]
    for _ in range(draws):
        dropped = set(rng.choice(T, size=k, replace=False).tolist())
        keeps.append([i for i in range(T) if i not in dropped])
    feats = model.forward_features(frames)  # (T, D)
    index = torch.tensor([i for keep in keeps for i in keep])
    lengths = torch.tensor([len(keep) for keep in keeps])
    probs = model.forward_head(feats[index], lengths).float().softmax(dim=-1)  # (1 + draws, K)
    p = float(explained.probabilities[predicted])
    return {
        "p": p,
        "top_drop": p - float(probs[0, predicted]),
        "random_drop": p - float(probs[1:, predicted].mean()),
        "predicted": predicted,
        "after_top": int(probs[0].argmax()),
        "after_random": probs[1:].argmax(dim=-1).tolist(),
    }


@torch.no_grad()
def cost(model: FusedClassifier, frames: torch.Tensor) -> tuple[float, float]:
    """Seconds of one plain forward pass of the clip, and of its explanation, timed back to back."""
    started = time.perf_counter()
    model(frames, torch.tensor([frames.shape[0]]))
    forward = time.perf_counter()
    occlusion(model, frames)
    return forward - started, time.perf_counter() - forward


def measure(checkpoint: Path, data: Path | None, k: int, draws: int, limit: int | None, seed: int) -> dict[str, Any]:
    ckpt = load_checkpoint(checkpoint)
    model, spec = ckpt.model.eval(), ckpt.input
    root = data or test_split(checkpoint)
    ds = ClipDataset(root, "test", image_size=spec.height, frames=spec.frames, labels=ckpt.labels)
    rng = np.random.default_rng(seed)
    rows, skipped, costs = [], 0, []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        frames, label, _ = ds[i]
        if frames.shape[0] <= k:  # nothing would be left to classify
            skipped += 1
            continue
        row = removal_drops(model, frames, k, draws, rng)
        rows.append(row | {"label": label, "frames": frames.shape[0]})
        if frames.shape[0] == spec.frames:
            costs.append(cost(model, frames))
    top, rand = [r["top_drop"] for r in rows], [r["random_drop"] for r in rows]
    return {
        "checkpoint": checkpoint.name,
        "head": ckpt.metadata["arch"]["head"]["name"],
        "clips": len(rows),
        "skipped_shorter_than_k": skipped,
        "model_clip_frames": spec.frames,
        "frames_per_clip": [min(r["frames"] for r in rows), max(r["frames"] for r in rows)],
        "mean_top_k_drop": statistics.fmean(top),
        "mean_random_k_drop": statistics.fmean(rand),
        "top_k_drop_larger": sum(t > r for t, r in zip(top, rand, strict=True)) / len(rows),
        "accuracy": statistics.fmean(r["predicted"] == r["label"] for r in rows),
        "accuracy_after_top_k": statistics.fmean(r["after_top"] == r["label"] for r in rows),
        "accuracy_after_random_k": statistics.fmean(a == r["label"] for r in rows for a in r["after_random"]),
        # on clips of the model's length, one at a time: a plain forward pass against an explanation
        "forward_ms_median": statistics.median(c[0] for c in costs) * 1000 if costs else None,
        "explain_ms_median": statistics.median(c[1] for c in costs) * 1000 if costs else None,
        "explain_over_forward": statistics.median(c[1] / c[0] for c in costs) if costs else None,
    }


def num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    k = result["k"]
    lines = [
        f"| model | clips | mean drop, top-{k} removed | mean drop, {k} random removed | top-{k} larger | "
        f"accuracy | after top-{k} | after random {k} | forward ms | explain ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        lines.append(
            f"| {m['checkpoint']} | {m['clips']} | {m['mean_top_k_drop']:.3f} | {m['mean_random_k_drop']:.3f} | "
            f"{m['top_k_drop_larger']:.1%} | {m['accuracy']:.1%} | {m['accuracy_after_top_k']:.1%} | "
            f"{m['accuracy_after_random_k']:.1%} | {num(m['forward_ms_median'])} | {num(m['explain_ms_median'])} | "
            f"{num(m['explain_over_forward'])} |"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("explain", help="faithfulness of explain=frames: top-k frames removed against random k")
    p.add_argument(
        "--checkpoint", type=Path, nargs="*", help="checkpoints (default: the bundled CNN+LSTM and CNN+attention)"
    )
    p.add_argument(
        "--data", type=Path, help="a folder with a test/ split (default: each checkpoint's own, regenerated)"
    )
    p.add_argument("--k", type=int, default=3, help="frames removed")
    p.add_argument("--draws", type=int, default=10, help="random removals per clip, averaged")
    p.add_argument("--limit", type=int, help="at most this many test clips")
    p.add_argument("--seed", type=int, default=0, help="seed of the random removals")
    p.add_argument("--out", type=Path, help="JSON result file, or a folder (default: bench/results)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    checkpoints = args.checkpoint or [p for p in bundled_checkpoints() if p.stem.endswith(("-lstm", "-attention"))]
    result = {
        "k": args.k,
        "draws": args.draws,
        "machine": machine(),
        "models": [measure(path, args.data, args.k, args.draws, args.limit, args.seed) for path in checkpoints],
    }
    out = write_json(result, args.out, "explain")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
