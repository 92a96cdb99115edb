"""JPEG decoding on the GPU (nvJPEG, ``app.gpu_decode``) against the CPU path, alone, without a server.

``python -m bench gpu-decode`` decodes moving-digits frames written as JPEGs at ``--sizes`` (default
64x64 and 224x224) to a model's frame size (the bundled model's unless ``--image-size``), resize
included: on the CPU as the decode threads do it (``media.decode_image``), on one thread and on
``--threads`` threads; on the GPU in one ``decode_jpeg`` call per batch of 1, 16 and 64 clips'
frames (16 frames a clip). Each figure is frames/s and clips/s over ``--min-time`` seconds. Where no
CUDA device or no torchvision with CUDA decoding is present, the GPU part is skipped and the report
says why; the CPU part still runs.

``--accuracy`` adds the accuracy of a checkpoint (default: the bundled CNN+LSTM) on its moving-digits
test split, its frames written as JPEG files at ``--accuracy-sizes``, with CPU-decoded frames and
with GPU-decoded frames (the model runs on the same device for both, so only the decoding differs).
With ``--stand-in`` and no GPU, torchvision's CPU ``decode_jpeg`` stands in for nvJPEG, followed by
the GPU path's own resize (``app.gpu_decode.resize_frames``): what the GPU path's full-size decode
and antialiased resize change against the CPU path's reduced-scale decode and Pillow resize.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app.gpu_decode import GpuJpeg, resize_frames
from app.preprocess import array_to_clip
from app.uploads import Target, decode_each
from bench.media import encode_jpeg, synth_clips
from bench.serve import write_outputs as write_json
from media import FrameFormat, Limits, sample_indices
from models import default_checkpoint, load_checkpoint

CLIP_FRAMES = 16
BATCH_CLIPS = (1, 16, 64)


def versions() -> dict[str, Any]:
    """The machine and library versions the figures were measured with."""
    found: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        found["torchvision"] = importlib.import_module("torchvision").__version__
    except Exception as exc:  # absent, or it does not load beside this torch
        found["torchvision"] = f"does not import ({type(exc).__name__})"
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    found["cpus"] = len(os.sched_getaffinity(0))
    return found


def rate(fn: Callable[[], object], frames: int, min_time: float) -> dict[str, float]:
    """Frames/s and clips/s of ``fn`` (which decodes ``frames`` frames), repeated for ``min_time`` s."""
    fn()  # warm: lazy initialisation, the first allocations
    runs, started = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        spent = time.perf_counter() - started
        if spent >= min_time:
            break
    fps = runs * frames / spent
    return {"frames_per_s": round(fps, 1), "clips_per_s": round(fps / CLIP_FRAMES, 1), "runs": runs}


def cpu_rates(blobs: list[bytes], target: Target, threads: int, min_time: float) -> dict[str, Any]:
    """The decode threads' code on one thread and on ``threads``: clips of ``CLIP_FRAMES`` frames each."""
    clips = [blobs[i : i + CLIP_FRAMES] for i in range(0, len(blobs), CLIP_FRAMES)]
    one = rate(lambda: [decode_each(c, target) for c in clips], len(blobs), min_time)
    with ThreadPoolExecutor(threads) as pool:
        many = rate(lambda: list(pool.map(lambda c: decode_each(c, target), clips)), len(blobs), min_time)
    return {"1_thread": one, f"{threads}_threads": many}


def gpu_rates(gpu: GpuJpeg, blobs: list[bytes], target: Target, min_time: float) -> dict[str, Any]:
    """One ``decode`` call per batch of 1, 16 and 64 clips' frames (frames reused where too few)."""
    out = {}
    for clips in BATCH_CLIPS:
        batch = [blobs[i % len(blobs)] for i in range(clips * CLIP_FRAMES)]
        out[f"batch_{clips}_clips"] = rate(lambda b=batch: gpu.decode(b, target), len(batch), min_time)
    return out


def gpu_decoder() -> tuple[GpuJpeg | None, str | None]:
    device = torch.device("cuda")
    reason = GpuJpeg.unavailable(device)
    return (None, reason) if reason else (GpuJpeg(device), None)


class CpuStandIn:
    """torchvision's CPU JPEG decoder, then the GPU path's resize: nvJPEG's stand-in where there is no GPU."""

    def __init__(self) -> None:
        self.tv_io = importlib.import_module("torchvision.io")

    def decode(self, blobs: list[bytes], target: Target) -> torch.Tensor:
        mode = self.tv_io.ImageReadMode.RGB if target.format.channels == 3 else self.tv_io.ImageReadMode.GRAY
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        frames = self.tv_io.decode_jpeg(data, mode=mode)
        return resize_frames(frames, target.format.height, target.format.width)


def stand_in() -> tuple[CpuStandIn | None, str | None]:
    try:
        return CpuStandIn(), None
    except Exception as exc:  # torchvision absent, or its operators do not load beside this torch
        return None, f"torchvision does not import ({type(exc).__name__}: {exc})"


def measure_rates(sizes: list[int], fmt: FrameFormat, clips: int, threads: int, min_time: float) -> dict[str, Any]:
    target = Target(fmt, CLIP_FRAMES, Limits(max_frames=max(BATCH_CLIPS) * CLIP_FRAMES))
    gpu, skipped = gpu_decoder()
    rows = []
    for size in sizes:
        blobs = [encode_jpeg(f) for clip in synth_clips(clips, CLIP_FRAMES, size) for f in clip]
        row: dict[str, Any] = {"source": f"{size}x{size}", "cpu": cpu_rates(blobs, target, threads, min_time)}
        row["gpu"] = gpu_rates(gpu, blobs, target, min_time) if gpu is not None else None
        rows.append(row)
    return {"target": f"{fmt.height}x{fmt.width}x{fmt.channels}", "gpu_skipped": skipped, "rates": rows}


def jpeg_clips(
    checkpoint: Path, data: Path | None, size: int, limit: int | None
) -> tuple[list[list[bytes]], list[int]]:
    """The test clips of ``data`` (default: the checkpoint's own split, regenerated under build/), sampled
    to its clip length, each frame re-encoded as a JPEG at ``size`` x ``size`` (bicubic, quality 90)."""
    from bench.explain import test_split
    from training.data import scan_split

    root = data or test_split(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    spec = ckpt.input
    clips, labels = [], []
    for clip in scan_split(root, "test", ckpt.labels).clips[:limit]:
        picks = sample_indices(len(clip.frames), spec.frames)
        blobs = []
        for i in picks:
            image = Image.open(clip.frames[int(i)]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            blobs.append(buf.getvalue())
        clips.append(blobs)
        labels.append(clip.label)
    return clips, labels


@torch.inference_mode()
def accuracy(
    checkpoint: Path, data: Path | None, sizes: list[int], limit: int | None, use_stand_in: bool = False
) -> dict[str, Any]:
    """Test accuracy with CPU-decoded and with GPU-decoded frames, the model on one device for both; with
    ``use_stand_in`` and no GPU, torchvision's CPU decoder and the GPU path's resize in nvJPEG's place."""
    gpu: GpuJpeg | CpuStandIn | None
    gpu, skipped = gpu_decoder()
    device = torch.device("cuda") if gpu is not None else torch.device("cpu")
    decoder = "nvJPEG"
    if gpu is None and use_stand_in:
        gpu, why = stand_in()
        skipped = None if gpu is not None else f"{skipped}; no stand-in: {why}"
        decoder = "torchvision's CPU decoder standing in for nvJPEG, then the GPU path's resize"
    ckpt = load_checkpoint(checkpoint, device=device)
    model, spec = ckpt.model.eval(), ckpt.input
    target = Target(FrameFormat.of(spec), spec.frames, Limits())
    rows = []
    for size in sizes:
        clips, labels = jpeg_clips(checkpoint, data, size, limit)
        cpu_right, gpu_right, differ, largest = 0, 0, [], 0
        for blobs, label in zip(clips, labels, strict=True):
            cpu_clip = array_to_clip(np.stack(decode_each(blobs, target))).to(device)
            lengths = torch.tensor([cpu_clip.shape[0]])
            cpu_right += int(model(cpu_clip, lengths).argmax()) == label
            if gpu is not None:
                gpu_clip = gpu.decode(blobs, target)
                gpu_right += int(model(gpu_clip, lengths).argmax()) == label
                diff = (gpu_clip.int() - cpu_clip.int()).abs()
                differ.append(float(diff.float().mean()))
                largest = max(largest, int(diff.max()))
        row: dict[str, Any] = {"source": f"{size}x{size}", "clips": len(clips), "cpu_accuracy": cpu_right / len(clips)}
        if gpu is not None:
            row |= {
                "gpu_accuracy": gpu_right / len(clips),
                "pixel_mean_abs_diff": round(statistics.fmean(differ), 3),
                "pixel_max_abs_diff": largest,
            }
        rows.append(row)
    return {
        "checkpoint": checkpoint.name,
        "device": str(device),
        "decoder": decoder,
        "gpu_skipped": skipped,
        "sizes": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [f"target {result['target']}; GPU: {result['gpu_skipped'] or result['machine']['device']}", ""]
    lines += ["| source | path | frames/s | clips/s |", "|---|---|---:|---:|"]
    for row in result["rates"]:
        for part in ("cpu", "gpu"):
            for name, r in (row[part] or {}).items():
                lines.append(f"| {row['source']} | {part} {name} | {r['frames_per_s']:.0f} | {r['clips_per_s']:.0f} |")
    if "accuracy" in result:
        acc = result["accuracy"]
        lines += ["", "| source | clips | CPU-decoded accuracy | GPU-decoded accuracy |", "|---|---:|---:|---:|"]
        for row in acc["sizes"]:
            gpu = f"{row['gpu_accuracy']:.1%}" if "gpu_accuracy" in row else f"skipped ({acc['gpu_skipped']})"
            lines.append(f"| {row['source']} | {row['clips']} | {row['cpu_accuracy']:.1%} | {gpu} |")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gpu-decode", help="nvJPEG decode rate against the CPU path; --accuracy: on the test split")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="source frame sides, pixels")
    p.add_argument("--image-size", type=int, help="the frame side decoded to (default: the bundled model's)")
    p.add_argument("--clips", type=int, default=8, help="distinct clips of 16 frames encoded per size")
    p.add_argument("--threads", type=int, default=8, help="CPU threads of the many-thread measurement")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds each figure is measured over")
    p.add_argument("--accuracy", action="store_true", help="also the test-split accuracy, CPU- and GPU-decoded")
    p.add_argument("--checkpoint", type=Path, help="checkpoint of --accuracy (default: the bundled CNN+LSTM)")
    p.add_argument("--accuracy-sizes", type=int, nargs="+", default=[32, 64, 100], help="JPEG sides for --accuracy")
    p.add_argument("--data", type=Path, help="a folder with a test/ split for --accuracy (default: the checkpoint's)")
    p.add_argument("--limit", type=int, help="at most this many test clips for --accuracy")
    p.add_argument("--stand-in", action="store_true", help="--accuracy without a GPU: torchvision on the CPU")
    p.add_argument("--out", type=Path, help="JSON result file, or a folder (default: bench/results)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    spec = load_checkpoint(default_checkpoint()).input
    side = args.image_size or spec.height
    fmt = FrameFormat(side, args.image_size or spec.width, spec.channels)
    result: dict[str, Any] = {"machine": versions(), "min_time_s": args.min_time}
    result |= measure_rates(args.sizes, fmt, args.clips, args.threads, args.min_time)
    if args.accuracy:
        checkpoint = args.checkpoint or default_checkpoint()
        result["accuracy"] = accuracy(checkpoint, args.data, args.accuracy_sizes, args.limit, args.stand_in)
    out = write_json(result, args.out, "gpu-decode")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
