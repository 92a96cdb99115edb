"""``python -m training {synth,fit,evaluate}``: the training command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models import preset_names
from models.system import tune_malloc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train and evaluate fusionserve models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the moving-digits dataset as folders of JPEG frames")
    synth.add_argument("--out", required=True, type=Path, help="output folder (train/ val/ test/ are created)")
    synth.add_argument(
        "--clips-per-label",
        type=int,
        default=400,
        help="train clips per label; val and test get a quarter each (default 400)",
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--canvas", type=int, default=32, help="frame size in pixels (default 32)")
    synth.add_argument("--min-frames", type=int, default=8, help="shortest clip (default 8)")
    synth.add_argument("--max-frames", type=int, default=16, help="longest clip (default 16)")

    fit = sub.add_parser("fit", help="train a model and write one .safetensors checkpoint")
    fit.add_argument("--data", required=True, type=Path, help="dataset folder with train/ val/ test/")
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
    fit.add_argument("--name", help="model name stored in the checkpoint (default: the output file's stem)")
    fit.add_argument("--resume", type=Path, help="training state file (<out>.train-state.safetensors) to continue from")
    fit.add_argument("--log", type=Path, help="JSON-lines metrics log (default: <out>.log.jsonl)")
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    ev = sub.add_parser("evaluate", help="measure a checkpoint on a dataset split")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data", required=True, type=Path)
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", type=Path, help="folder for report.json")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--device", default="auto")
    return parser


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

    overrides = {
        k: getattr(args, k)
        for k in (
            "model",
            "epochs",
            "batch_size",
            "lr",
            "frames",
            "image_size",
            "patience",
            "seed",
            "device",
            "workers",
            "name",
        )
    }
    cfg = load_config(args.config, overrides)
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
    from torch.utils.data import DataLoader

    from models import load_checkpoint
    from training.data import FrameFolderDataset, collate_ragged
    from training.evaluate import evaluate
    from training.fit import pick_device

    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    spec = ckpt.input
    ds = FrameFolderDataset(
        args.data,
        args.split,
        image_size=spec["height"],
        frames=spec["frames"],
        channels=spec["channels"],
        labels=ckpt.labels,
    )
    loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=collate_ragged)
    report = {"checkpoint": str(args.checkpoint), "split": args.split, **evaluate(ckpt.model, loader, device)}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    tune_malloc()
    commands = {"synth": cmd_synth, "fit": cmd_fit, "evaluate": cmd_evaluate}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
