"""timm and torchvision frame encoders against the bundled models' small CNN: size, cost, speed, accuracy.

``python -m bench backbones`` takes each encoder of ``--encoders`` (``timm:NAME``, ``torchvision:NAME``
or ``small_cnn``, the bundled models' own encoder) under the LSTM head, and reports:

- the encoder's parameters and FLOPs per frame at the backbone's own input size (its published
  weights' size, ``models.backbones.defaults``; 32 for ``small_cnn``), from ``profile_encoder``;
- in-process clips/s of the whole model (encoder + LSTM head) on uint8 clips of ``--frames`` frames
  with channels-last strides (as decoded frames reach it), at each of ``--batches``, at the own size
  and at ``--small-size`` (32: the moving-digits frames). The model is prepared as the server's CPU
  runtime prepares it: eval mode, batch norms folded into the convs, channels-last, the encoder
  run in slices of at most ``--pass-pixels`` input pixels, glibc's allocator tuned; torch keeps
  its default thread count. Each cell waits (up to ``--quiet-wait`` s) for the machine to go quiet,
  since another tenant's burst on one of two cores stalls torch's OpenMP threads many times over,
  and records the cores other processes used while it ran (``other_cores``). One warm-up call, then
  timed calls until ``--min-time`` seconds have passed (at least one: a large cell may get a single
  repetition; each cell records how many), and the median call gives clips/s. Random weights: the
  speed does not depend on them;
- with ``--accuracy``: the moving-digits test accuracy of the encoder trained from scratch under
  the LSTM head at ``--small-size`` (``python -m training fit`` in a subprocess, this interpreter,
  ``--epochs`` epochs) on a dataset written once under build/ (``--clips-per-label`` train clips a
  label, a quarter of that for val and for test), or on ``--data``.

The machine's speed drifts (shared cores), so compare rows within one run; the accuracies are of
short runs from random weights, which is how far a small dataset gets a backbone, not its ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from app.autotune import make_batch
from app.runtime import frames_per_encoder_pass
from app.settings import PASS_PIXELS
from bench.serve import machine, write_outputs
from bench.streams import machine_busy_s
from host.malloc import tune_malloc
from models import InputSpec, LSTMHeadConfig, ModelConfig, TimmConfig, TorchvisionConfig, build_model, preset_config
from models.backbones import defaults
from models.classifier import FusedClassifier
from models.encoders import fold_batchnorm
from models.profile import profile_encoder
from training.synth import LABELS, SynthConfig, write_dataset

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "small_cnn"  # the bundled models' encoder, at their 32x32 frames
REFERENCE_SIZE = 32
ENCODERS = (
    REFERENCE,
    "timm:resnet18",
    "timm:mobilenetv3_small_100",
    "timm:efficientnet_b0",
    "timm:convnext_atto",
    "timm:regnety_002",
    "torchvision:mobilenet_v3_small",
)


def own_size(encoder: str) -> int:
    """The input size ``encoder``'s published weights were trained at (32 for the small CNN)."""
    if encoder == REFERENCE:
        return REFERENCE_SIZE
    source, name = split_name(encoder)
    return defaults(source, name).input_size


def split_name(encoder: str) -> tuple[str, str]:
    """``timm:NAME`` or ``torchvision:NAME`` as (source, NAME); anything else is an error."""
    source, sep, name = encoder.partition(":")
    if not sep or not name or source not in ("timm", "torchvision"):
        raise ValueError(f"encoder {encoder!r}: give {REFERENCE}, timm:NAME or torchvision:NAME")
    return source, name


def model_config(encoder: str, image_size: int) -> ModelConfig:
    """Encoder + LSTM head for the 8 moving-digits labels at ``image_size``: the bundled CNN+LSTM's
    preset for ``small_cnn``, else the backbone with its published weights' normalisation (as
    ``python -m training fit --encoder`` builds it)."""
    if encoder == REFERENCE:
        return preset_config("lstm", num_classes=len(LABELS), image_size=image_size)
    source, name = split_name(encoder)
    known = defaults(source, name)
    enc = TimmConfig(model=name) if source == "timm" else TorchvisionConfig(model=name)
    return ModelConfig(len(LABELS), enc, LSTMHeadConfig(), image_size=image_size, mean=known.mean, std=known.std)


def serving_model(cfg: ModelConfig, frames: int, pass_pixels: int) -> tuple[FusedClassifier, int]:
    """The model of ``cfg`` as the server's CPU runtime runs it: eval mode, batch norms folded, the
    encoder sliced to ``pass_pixels`` per pass. Returns it and how many batch norms were folded."""
    model = build_model(cfg).eval()
    folded = fold_batchnorm(model)
    spec = InputSpec.for_model(cfg, frames=frames, min_frames=1, max_frames=frames)
    model.frames_per_pass = frames_per_encoder_pass(spec, pass_pixels, torch.device("cpu"), compiled=False)
    return model, folded


@torch.inference_mode()
def time_cell(model: FusedClassifier, batch: int, frames: int, min_time: float) -> dict[str, Any]:
    """Clips/s of ``model`` on ``batch`` random uint8 clips of ``frames`` frames at its input size: one
    warm-up call, then calls until ``min_time`` seconds have passed (at least one); the median call."""
    size = model.config.image_size
    clips, lengths = make_batch(batch, frames, (model.config.in_channels, size, size))
    model(clips, lengths)
    times: list[float] = []
    others = OtherCores()
    started = time.perf_counter()
    while not times or time.perf_counter() - started < min_time:
        call = time.perf_counter()
        model(clips, lengths)
        times.append(time.perf_counter() - call)
    median = statistics.median(times)
    other_cores = others.since()
    return {
        "image_size": size,
        "batch": batch,
        "frames": frames,
        "frames_per_pass": model.frames_per_pass,
        "repetitions": len(times),
        "median_s": median,
        "fastest_s": min(times),
        "clips_per_s": batch / median,
        "other_cores": other_cores,  # what other tenants used meanwhile (0.15 and more: a noisy cell)
    }


class OtherCores:
    """Cores used by every other process of the machine since it was made: the machine's CPU time
    (/proc/stat) less this process's and its finished children's, over the wall time."""

    def __init__(self) -> None:
        self.started, self.machine, self.own = time.perf_counter(), machine_busy_s(), own_cpu_s()

    def since(self) -> float | None:
        now = machine_busy_s()
        if now is None or self.machine is None:
            return None
        other = (now - self.machine) - (own_cpu_s() - self.own)
        return round(max(0.0, other) / (time.perf_counter() - self.started), 3)


def own_cpu_s() -> float:
    """CPU seconds of this process (all its threads) and of its children that have exited."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def wait_quiet(limit_s: float, cores: float = 0.15, window_s: float = 1.0) -> float:
    """Wait until every process of the machine together has used under ``cores`` over ``window_s``,
    for at most ``limit_s``; the seconds waited (``limit_s`` or more: it stayed busy)."""
    started = time.perf_counter()
    while (waited := time.perf_counter() - started) < limit_s:
        before = machine_busy_s()
        time.sleep(window_s)
        after = machine_busy_s()
        if before is None or after is None or (after - before) / window_s < cores:
            return round(waited, 1)
    log(f"the machine stayed busy for {limit_s:.0f} s (other tenants); measuring anyway")
    return round(waited, 1)


def measure_speed(encoder: str, args: argparse.Namespace) -> dict[str, Any]:
    """Parameters and FLOPs per frame at the own size (or ``--input-size``), and clips/s at each batch
    at that size and at ``--small-size``."""
    size = args.input_size or own_size(encoder)
    profile = profile_encoder(build_model(model_config(encoder, size)))
    row: dict[str, Any] = {
        "encoder": encoder,
        "input_size": size,
        "parameters": profile["parameters"],
        "flops_per_frame": profile["flops_per_frame"],
        "speed": [],
    }
    for image_size in sorted({size, args.small_size}, reverse=True):
        model, row["batchnorms_folded"] = serving_model(
            model_config(encoder, image_size), args.frames, args.pass_pixels
        )
        for batch in args.batches:
            waited = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
            cell = time_cell(model, batch, args.frames, args.min_time) | {"waited_for_quiet_s": waited}
            row["speed"].append(cell)
            log(
                f"{encoder} {image_size}px b{batch}: {cell['clips_per_s']:.2f} clips/s ({cell['repetitions']} reps, "
                f"other processes {cell['other_cores']} cores)"
            )
    return row


def moving_digits(clips_per_label: int, seed: int, folder: Path = ROOT / "build") -> Path:
    """The moving-digits dataset (32x32 frames, clips of 8-16), written once under ``folder``."""
    root = folder / f"backbones-moving-digits-{clips_per_label}-seed{seed}"
    if not (root / "dataset.json").is_file():  # written last: its presence means a whole dataset
        write_dataset(root, SynthConfig(clips_per_label=clips_per_label, seed=seed))
    return root


def fit_command(encoder: str, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """``python -m training fit`` for ``encoder`` from scratch at ``--small-size``, this interpreter."""
    argv = [sys.executable, "-m", "training", "fit", "--data", str(data), "--out", str(out)]
    argv += ["--image-size", str(args.small_size), "--epochs", str(args.epochs), "--frames", str(args.frames)]
    argv += ["--batch-size", str(args.train_batch_size), "--no-progress"]
    return argv if encoder == REFERENCE else [*argv, "--encoder", encoder]


def fit_env(args: argparse.Namespace) -> dict[str, str]:
    """The training run's environment: this one's, with ``--threads`` as its torch thread count."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def measure_accuracy(encoder: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``encoder`` (subprocess) and read the test accuracy and wall time from the JSON line it
    prints last; a failed or timed-out run gives its error instead."""
    out = args.checkpoints / f"{encoder.replace(':', '-')}.safetensors"
    argv = fit_command(encoder, data, out, args)
    waited = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
    others = OtherCores()
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=args.fit_timeout, cwd=ROOT, check=False, env=fit_env(args)
        )
    except subprocess.TimeoutExpired:
        return {"command": argv, "error": f"timed out after {args.fit_timeout} s"}
    process_s = time.perf_counter() - started
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"command": argv, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    report = json.loads(lines[-1])
    test, val = report["metrics"]["test"], report["metrics"].get("val", {})
    return {
        "command": argv,
        "test_accuracy": test["accuracy"],
        "test_clips": test.get("clips"),
        "val_accuracy": val.get("accuracy"),
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "fit_wall_time_s": report["wall_time_s"],  # fit's own time: data loading, training, evaluation
        "process_s": process_s,  # the whole subprocess, interpreter start and imports included
        "other_cores": others.since(),  # what other tenants used meanwhile: the wall times' noise
        "waited_for_quiet_s": waited,
        "checkpoint": report["checkpoint"],
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def guarded(encoder: str, what: str, fn: Any, *fn_args: Any) -> dict[str, Any]:
    """``fn(encoder, ...)``, or a row with the error when it raises: one model that cannot be built or
    run does not end a run of many."""
    try:
        return dict(fn(encoder, *fn_args))
    except Exception as exc:
        log(f"{encoder}: {what} failed: {type(exc).__name__}: {exc}")
        return {"encoder": encoder, "error": f"{what}: {type(exc).__name__}: {exc}"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Speed for every encoder first (before training loads the machine), then the accuracies."""
    rows = [guarded(encoder, "speed", measure_speed, args) for encoder in args.encoders]
    accuracy: dict[str, Any] | None = None
    if args.accuracy:
        data = args.data or moving_digits(args.clips_per_label, args.seed)
        accuracy = {"data": str(data), "epochs": args.epochs, "image_size": args.small_size}
        accuracy |= {"frames": args.frames, "batch_size": args.train_batch_size}
        accuracy["clips_per_label"] = None if args.data else args.clips_per_label
        args.checkpoints.mkdir(parents=True, exist_ok=True)
        for row in rows:
            log(f"{row['encoder']}: training {args.epochs} epochs")
            row["accuracy"] = guarded(row["encoder"], "accuracy", measure_accuracy, data, args)
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "settings": {
            "frames": args.frames,
            "batches": args.batches,
            "small_size": args.small_size,
            "min_time_s": args.min_time,
            "pass_pixels": args.pass_pixels,
            "quiet_wait_s": args.quiet_wait,
            "fold_batchnorm": True,
            "channels_last": True,
            "accuracy": accuracy,
        },
        "encoders": rows,
    }


def cell(row: dict[str, Any], size: int, batch: int) -> str:
    found = [c for c in row.get("speed", []) if c["image_size"] == size and c["batch"] == batch]
    return f"{found[0]['clips_per_s']:.2f}" if found else "-"


def markdown(result: dict[str, Any]) -> str:
    """One row an encoder: size, cost, clips/s at each batch at its own size and the small size, accuracy."""
    small, batches = result["settings"]["small_size"], result["settings"]["batches"]
    speed = [f"clips/s b{b} @own" for b in batches] + [f"clips/s b{b} @{small}" for b in batches]
    lines = [
        "| encoder | own size | params (M) | GFLOPs/frame @own | " + " | ".join(speed) + " | test acc | fit s |",
        "|---|---:|---:|---:|" + "---:|" * len(speed) + "---:|---:|",
    ]
    for row in result["encoders"]:
        if "speed" not in row:
            lines.append(f"| {row['encoder']} | failed: {row.get('error', '')} |")
            continue
        size = row["input_size"]
        cells = [cell(row, size, b) for b in batches] + [cell(row, small, b) for b in batches]
        acc = row.get("accuracy") or {}
        accuracy = f"{acc['test_accuracy']:.1%}" if "test_accuracy" in acc else ("failed" if acc else "-")
        fit_s = f"{acc['fit_wall_time_s']:.0f}" if "fit_wall_time_s" in acc else "-"
        lines.append(
            f"| {row['encoder']} | {size} | {row['parameters'] / 1e6:.2f} | {row['flops_per_frame'] / 1e9:.3f} | "
            + " | ".join(cells)
            + f" | {accuracy} | {fit_s} |"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("backbones", help="timm/torchvision encoders against the small CNN: size, speed, accuracy")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), help="small_cnn, timm:NAME, torchvision:NAME")
    p.add_argument("--frames", type=int, default=16, help="frames per clip, timed and trained (default 16)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="clips per call timed (default 1 16)")
    p.add_argument("--small-size", type=int, default=32, help="the second size timed, and trained at (default 32)")
    p.add_argument("--input-size", type=int, help="instead of each encoder's own input size (tests)")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per cell (default 2)")
    p.add_argument(
        "--pass-pixels", type=int, default=PASS_PIXELS, help="most input pixels per encoder pass, as the server "
        f"(default {PASS_PIXELS}); 0: whole batches",
    )  # fmt: skip
    p.add_argument(
        "--quiet-wait", type=float, default=30, help="before each cell and training run, wait up to this many s "
        "for the machine to go quiet (0: do not wait)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads, timed and trained (default: torch's own)")
    p.add_argument("--accuracy", action="store_true", help="also train each encoder on moving digits (slow)")
    p.add_argument("--data", type=Path, help="dataset with train/ val/ test/ (default: moving digits under build/)")
    p.add_argument("--clips-per-label", type=int, default=50, help="train clips per label (default 50)")
    p.add_argument("--seed", type=int, default=0, help="the dataset's seed (default 0)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--train-batch-size", type=int, default=16, help="training batch size (default 16)")
    p.add_argument("--fit-timeout", type=float, default=1800, help="seconds allowed one training run")
    p.add_argument(
        "--checkpoints", type=Path, default=ROOT / "build" / "backbones-bench", help="folder for trained checkpoints"
    )
    p.add_argument("--out", type=Path, help="JSON result file, or a folder (default: bench/results)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    tune_malloc()  # as the server does, before any other thread starts
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    out = write_outputs(result, args.out, "backbones")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
