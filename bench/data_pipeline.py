"""Data pipeline throughput: clips/s from a folder of MP4s versus a folder of JPEG frames.

Writes the same moving-digits clips both ways, then times a full pass of the training
DataLoader (lazy decoding, TSN sampling to ``--frames``) for each layout and worker
count. Configurations are interleaved over ``--rounds`` so that noise on a shared
machine hits them alike; the report gives each median and its ratio to the JPEG,
0-worker baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.media import encode_jpeg, encode_mp4, synth_clips
from training.config import TrainConfig
from training.data import ClipDataset
from training.fit import Dist, make_loader
from training.synth import LABELS


def write_corpus(root: Path, clips: int, length: int, size: int) -> None:
    """``clips`` moving-digit clips per layout: root/jpeg/test/<label>/<clip>/*.jpg and root/mp4/test/<label>/*.mp4."""
    for i, frames in enumerate(synth_clips(clips, length, size)):
        label = LABELS[i % len(LABELS)]
        folder = root / "jpeg" / "test" / label / f"clip{i:04d}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(frames):
            (folder / f"{t:03d}.jpg").write_bytes(encode_jpeg(frame))
        video = root / "mp4" / "test" / label / f"clip{i:04d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(encode_mp4(frames))
    for layout in ("jpeg", "mp4"):
        (root / layout / "classes.txt").write_text("\n".join(LABELS) + "\n")


def one_pass(ds: ClipDataset, workers: int) -> float:
    """Seconds for one pass over ``ds`` with ``workers`` DataLoader processes (worker start-up included)."""
    cfg = TrainConfig(batch_size=8, workers=workers)
    loader = make_loader(ds, cfg, Dist(), shuffle=False, epoch=0, device=torch.device("cpu"))
    started = time.perf_counter()
    n = sum(len(batch.lengths) for batch in loader)
    elapsed = time.perf_counter() - started
    assert n == len(ds), f"decoded {n} of {len(ds)} clips"
    return elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root, args.clips, args.length, args.size)
        datasets = {
            layout: ClipDataset(root / layout, "test", image_size=args.image_size, frames=args.frames, preload=False)
            for layout in ("jpeg", "mp4")
        }
        configs = [(layout, w) for layout in ("jpeg", "mp4") for w in args.workers]
        times: dict[str, list[float]] = {f"{layout}/{w}": [] for layout, w in configs}
        for _ in range(args.rounds):
            for layout, w in configs:
                times[f"{layout}/{w}"].append(one_pass(datasets[layout], w))
    rates = {key: args.clips / statistics.median(ts) for key, ts in times.items()}
    base = rates[f"jpeg/{args.workers[0]}"]
    return {
        "benchmark": "data_pipeline",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "out")},
        "clips_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_jpeg_baseline": {k: round(v / base, 2) for k, v in rates.items()},
        "seconds_per_pass": {k: [round(t, 3) for t in ts] for k, ts in times.items()},
    }


def add_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="data pipeline clips/s: MP4 folder vs JPEG frame folder, 0/1/2 workers")
    p.add_argument("--clips", type=int, default=64, help="clips in each corpus")
    p.add_argument("--length", type=int, default=48, help="frames in each source clip")
    p.add_argument("--size", type=int, default=64, help="source frame size in pixels")
    p.add_argument("--frames", type=int, default=16, help="frames sampled per clip (TSN)")
    p.add_argument("--image-size", type=int, default=32, help="model input size the frames are resized to")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0
