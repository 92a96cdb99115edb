"""Real media files for dataset tests: moving-digits clips written as JPEG/PNG folders and MP4/WebM videos."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

from training.synth import SynthConfig, load_digit_splits, render_clip


def clip_frames(label: str, seed: int, frames: int = 10, size: int = 32) -> np.ndarray:
    """uint8 (T, S, S, 3)."""
    cfg = SynthConfig(canvas=size, min_frames=frames, max_frames=frames)
    digit = load_digit_splits(0)["train"][seed % 100]
    return render_clip(label, digit, cfg, np.random.default_rng(seed))


def write_frames(folder: Path, frames: np.ndarray, fmt: str = "jpg") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"img_{i + 1}.{fmt}")  # img_10 after img_9: natural order matters
    return folder


def write_video(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """MP4 (H.264) or WebM (VP9) by suffix, written with PyAV's encoders."""
    codec = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libx264", ".avi": "mpeg4"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"g": "4"}  # frequent keyframes, so seeking has somewhere to land
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
