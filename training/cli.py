"""``python -m training {synth,fit,evaluate}``: the training command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from host.malloc import tune_malloc
from models import preset_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate fusionserve models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_synth(sub.add_parser("synth", help="write the moving-digits dataset as folders of JPEG frames"))
    add_fit(sub.add_parser("fit", help="train a model and write one .safetensors checkpoint"))
    add_evaluate(sub.add_parser("evaluate", help="measure a checkpoint: report.json, confusion.png, curves.png"))
    scan = sub.add_parser("scan", help="count clips per split and class; report unreadable or empty files")
    scan.add_argument("--data", required=True, type=Path)
    export = sub.add_parser("export", help="export a checkpoint (ONNX) and check it against PyTorch")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    export.add_argument("--out", required=True, type=Path)
    return parser


def add_synth(synth: argparse.ArgumentParser) -> None:
    synth.add_argument("--out", required=True, type=Path, help="output folder (train/ val/ test/ are created)")
    synth.add_argument(
        "--clips-per-label", type=int, default=400, help="train clips per label; val and test get a quarter each"
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--canvas", type=int, default=32, help="frame size in pixels (default 32)")
    synth.add_argument("--min-frames", type=int, default=8, help="shortest clip (default 8)")
    synth.add_argument("--max-frames", type=int, default=16, help="longest clip (default 16)")


# fit's flags that override the config file's keys of the same names (None: not given)
FIT_OVERRIDES = (
    "model", "epochs", "batch_size", "lr", "frames", "image_size", "patience", "seed", "device", "workers",
    "eval_clips", "augment", "hflip", "repeat_short", "name", "encoder", "pretrained", "freeze_encoder",
    "encoder_lr_mult", "grad_checkpointing", "cache_features",
)  # fmt: skip


def add_fit(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--data", required=True, type=Path, help="dataset folder: train/ val/ test/, or list files")
    fit.add_argument("--model", choices=preset_names(), help="temporal head (default lstm)")
    fit.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    fit.add_argument("--config", type=Path, help="TOML file with training settings; flags override it")
    fit.add_argument("--epochs", type=int)
    fit.add_argument("--batch-size", type=int)
    fit.add_argument("--lr", type=float)
    fit.add_argument("--frames", type=int, help="frames per clip; longer clips are sampled down")
    fit.add_argument("--image-size", type=int, help="frame height and width fed to the model")
    fit.add_argument("--patience", type=int, help="early-stopping patience in epochs")
    fit.add_argument("--seed", type=int)
    fit.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    fit.add_argument("--workers", type=int, help="DataLoader worker processes")
    fit.add_argument("--eval-clips", type=int, help="temporal clips per video averaged at evaluation")
    on_off = {"action": argparse.BooleanOptionalAction, "default": None}
    fit.add_argument("--augment", **on_off, help="random resized crop and horizontal flip (see --hflip)")
    fit.add_argument("--hflip", **on_off, help="flip in augmentation (off where left and right differ)")
    fit.add_argument("--repeat-short", **on_off, help="repeat frames of clips shorter than --frames")
    fit.add_argument("--name", help="model name stored in the checkpoint (default: the output file's stem)")
    fit.add_argument(
        "--encoder",
        help="frame encoder timm:NAME or torchvision:NAME (default: the seed's small CNN); [backbones] extra",
    )
    fit.add_argument("--pretrained", help="the encoder's start: hub (download its published weights) or a .safetensors")
    fit.add_argument("--freeze-encoder", type=int, metavar="N", help="epochs with the encoder frozen, then fine-tune")
    fit.add_argument("--encoder-lr-mult", type=float, help="the encoder's learning rate as a multiple of --lr")
    fit.add_argument("--grad-checkpointing", **on_off, help="timm encoders: recompute activations (less memory)")
    fit.add_argument(
        "--cache-features", **on_off, help="with the encoder frozen every epoch: encode each frame once, train the head"
    )
    fit.add_argument("--resume", type=Path, help="training state file (<out>.train-state.safetensors) to continue from")
    fit.add_argument("--log", type=Path, help="JSON-lines metrics log (default: <out>.log.jsonl)")
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_evaluate(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("data_pos", nargs="?", type=Path, metavar="DATA", help="dataset folder (or use --data)")
    ev.add_argument("--data", type=Path, help="dataset folder")
    ev.add_argument("--split", default="test", help="split to measure (default test)")
    ev.add_argument("--out", type=Path, help="folder for report.json and the plots (default: print only)")
    ev.add_argument(
        "--log", type=Path, help="the run's JSON-lines log for curves.png (default: <checkpoint>.log.jsonl)"
    )
    ev.add_argument("--eval-clips", type=int, default=1, help="temporal clips per video, logits averaged")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ev.add_argument("--device", default="auto")


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synth import SynthConfig, write_dataset

    cfg = SynthConfig(
        canvas=args.canvas,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        clips_per_label=args.clips_per_label,
        seed=args.seed,
    )
    counts = write_dataset(args.out, cfg)
    print(json.dumps({"out": str(args.out), "clips": counts}))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.fit import fit

    cfg = load_config(args.config, {k: getattr(args, k) for k in FIT_OVERRIDES})
    result = fit(
        args.data, args.out, cfg, resume=args.resume, log_path=args.log, progress=False if args.no_progress else None
    )
    print(
        json.dumps(
            {
                "checkpoint": str(result.checkpoint),
                "metrics": result.metrics,
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "wall_time_s": result.wall_time_s,
            }
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from host.device import pick_device
    from models import load_checkpoint
    from training.config import TrainConfig
    from training.data import ClipDataset
    from training.evaluate import full_report, predict, write_report
    from training.fit import Dist, EpochLoaders

    data = args.data or args.data_pos
    if data is None:
        raise ValueError("give the dataset folder (DATA or --data)")
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    spec = ckpt.input
    ds = ClipDataset(
        data,
        args.split,
        image_size=spec.height,
        frames=spec.frames,
        channels=spec.channels,
        labels=ckpt.labels,
        repeat_short=ckpt.metadata["training"].get("config", {}).get("repeat_short", False),
    )
    cfg = TrainConfig(batch_size=args.batch_size, workers=args.workers, eval_clips=args.eval_clips)
    loaders = EpochLoaders(cfg, Dist(), device)
    runs = []
    for k in range(args.eval_clips):
        ds.clip_offset = None if args.eval_clips == 1 else (k + 0.5) / args.eval_clips
        runs.append(predict(ckpt.model, loaders(ds, shuffle=False), device))
    logits = sum(r.logits for r in runs) / len(runs)
    report = {
        "checkpoint": str(args.checkpoint),
        "model": ckpt.name,
        "data": str(data),
        "split": args.split,
        "eval_clips": args.eval_clips,
        **full_report(logits, runs[0].targets, ckpt.labels),
        "skipped": {
            "count": len(runs[0].skipped) + len(ds.problems),
            "files": ds.problems + [f"{s.path}: {s.reason}" for s in runs[0].skipped],
        },
    }
    if args.out:
        log_path = args.log or args.checkpoint.with_suffix(".log.jsonl")
        report["files"] = [str(p) for p in write_report(report, args.out, log_path)]
    print(json.dumps({k: v for k, v in report.items() if k not in ("per_class", "confusion_matrix")}))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from training.data import scan_report

    report = scan_report(args.data)
    for split, info in report["splits"].items():
        print(f"{split}: {info['clips']} readable clips")
        for label in report["labels"]:
            print(f"  {label}: {info['per_class'].get(label, 0)}")
        for problem in info["problems"]:
            print(f"  unreadable: {problem}")
    print(
        json.dumps(
            {split: {"clips": i["clips"], "problems": len(i["problems"])} for split, i in report["splits"].items()}
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export

    print(json.dumps(export(args.checkpoint, args.out, args.format)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_malloc()
    commands = {"synth": cmd_synth, "fit": cmd_fit, "evaluate": cmd_evaluate, "scan": cmd_scan, "export": cmd_export}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
