"""Timelines of a long video: what a window per frame costs against a window per clip.

``python -m bench timeline --checkpoint FILE|seed`` writes a moving-digits video (``--seconds 120``
at ``--video-fps 24``, ``--size`` pixels square, H.264 MP4, cached under build/), starts the real
server (``python -m app``, as ``bench serve`` does), and times ``POST /timeline?fps=8`` with
``stride`` = ``window`` (windows side by side) against ``stride=1`` (a window at every sampled
frame), one request at a time, the two alternating over ``--rounds`` so that neither is always
first. The server encodes each sampled frame once whatever the stride, so the ratio of the two
medians is what the extra head passes cost; decoding and the encoder are the same on both sides.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np

from bench.serve import ServerProcess, machine, parse_env, quiet_client_logs, resolve_checkpoint, running
from bench.serve import write_outputs as write_json
from training.synth import LABELS, SynthConfig, load_digit_splits, render_clip

log = logging.getLogger(__name__)

CLIP = 48  # frames per moving-digits clip in the video: a new digit and motion every 2 s at 24 fps


def long_video(seconds: float, size: int, fps: int, folder: Path = Path("build")) -> Path:
    """A moving-digits MP4 (H.264) of ``seconds`` at ``fps``, ``size`` pixels square, written once and
    reused; encoded clip by clip, so it is never all in memory."""
    path = folder / f"timeline-{size}px-{fps}fps-{seconds:g}s.mp4"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    frames = round(seconds * fps)
    cfg = SynthConfig(canvas=size, min_frames=CLIP, max_frames=CLIP)
    digits, rng = load_digit_splits(0)["test"], np.random.default_rng(0)
    partial = path.with_suffix(".part.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(0, frames, CLIP):
            n = i // CLIP
            clip = render_clip(LABELS[n % len(LABELS)], digits[n % len(digits)], cfg, rng)[: frames - i]
            for frame in clip:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    partial.rename(path)
    return path


def timed(client: httpx.Client, url: str, video: bytes, query: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Seconds for one /timeline request, and its answer."""
    started = time.perf_counter()
    r = client.post(f"{url}/timeline", params=query, files={"video": ("long.mp4", video, "video/mp4")})
    took = time.perf_counter() - started
    r.raise_for_status()
    return took, r.json()


def measure(url: str, video: bytes, args: argparse.Namespace) -> dict[str, Any]:
    with httpx.Client(timeout=600) as client:
        info = client.get(f"{url}/models").json()
        default = next(m for m in info["models"] if m["default"])
        window = args.window or default["input"]["frames"]
        sides = {"stride=window": {"fps": args.fps, "window": window, "stride": window}}
        sides["stride=1"] = {"fps": args.fps, "window": window, "stride": 1}
        for query in sides.values():  # warm-up, discarded
            timed(client, url, video, query)
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        answers: dict[str, dict[str, Any]] = {}
        for i in range(args.rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                took, answers[name] = timed(client, url, video, sides[name])
                seconds[name].append(round(took, 4))
                log.info("round %d %s: %.3f s", i, name, took)
    median = {name: round(statistics.median(s), 4) for name, s in seconds.items()}
    return {
        "model": default["name"],
        "window": window,
        "frames": answers["stride=1"]["frames"],
        "duration_s": answers["stride=1"]["duration_s"],
        "segments": {name: len(a["segments"]) for name, a in answers.items()},
        "seconds": seconds,
        "median_s": median,
        "ratio_stride1_over_window": round(median["stride=1"] / median["stride=window"], 3),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = long_video(args.seconds, args.size, args.video_fps)
    video = path.read_bytes()
    env = parse_env(args.env)
    server = ServerProcess(resolve_checkpoint(args.checkpoint), env)
    with running(server):
        measured = measure(server.url, video, args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func", "out")}
    return {
        "benchmark": "timeline",
        "machine": machine(),
        "settings": {**settings, "checkpoint": str(server.checkpoint)},
        "server_env": env,
        "video": {"path": str(path), "bytes": len(video), "seconds": args.seconds, "fps": args.video_fps},
        **measured,
        "server_exit_code": server.exit_code,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| stride | segments | median s | rounds (s) |",
        "|---|---|---|---|",
    ]
    for name, seconds in result["seconds"].items():
        rows.append(
            f"| {name} | {result['segments'][name]} | {result['median_s'][name]} | "
            f"{', '.join(f'{s:g}' for s in seconds)} |"
        )
    head = (
        f"{result['model']}: {result['duration_s']} s of video, {result['frames']} frames sampled at "
        f"{result['settings']['fps']:g} fps, windows of {result['window']}"
    )
    return f"{head}\n\n" + "\n".join(rows) + f"\n\nstride=1 / stride=window: {result['ratio_stride1_over_window']}x"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("timeline", help="/timeline of a long video: a window at every frame against side by side")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint the server loads, or 'seed' for the seed-shaped model (default: the bundled model)",
    )
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="server settings")
    p.add_argument("--seconds", type=float, default=120.0, help="length of the video")
    p.add_argument("--size", type=int, default=64, help="the video's width and height in pixels")
    p.add_argument("--video-fps", type=int, default=24, help="the video's frame rate")
    p.add_argument("--fps", type=float, default=8.0, help="frames the timeline samples per second")
    p.add_argument("--window", type=int, default=None, help="frames per window (default: the model's clip length)")
    p.add_argument("--rounds", type=int, default=5, help="timed requests per stride, alternating")
    p.add_argument(
        "--out", type=Path, help="JSON result file, or a folder for timeline-<time>.json (default: bench/results)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    quiet_client_logs()
    result = run(args)
    out = write_json(result, args.out, "timeline")
    print(markdown(result))
    print(f"\nJSON: {out}")
    return 0
