"""Real media for the benchmarks: moving-digits clips encoded as JPEG frames or MP4 (libx264)."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

from training.synth import LABELS, SynthConfig, load_digit_splits, render_clip


def synth_clips(count: int, frames: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` moving-digits clips of ``frames`` uint8 (size, size, 3) frames, labels cycled."""
    cfg = SynthConfig(canvas=size, min_frames=frames, max_frames=frames)
    digits = load_digit_splits(seed)["test"]
    rng = np.random.default_rng(seed)
    return [render_clip(LABELS[i % len(LABELS)], digits[i % len(digits)], cfg, rng) for i in range(count)]


def resize_clip(clip: np.ndarray, height: int, width: int) -> np.ndarray:
    """``clip`` (T, H, W, 3) uint8 at (T, height, width, 3), bilinear; the clip itself when already that size."""
    if clip.shape[1:3] == (height, width):
        return clip
    size, bilinear = (width, height), Image.Resampling.BILINEAR
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, bilinear)) for frame in clip])


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mp4(clip: np.ndarray, fps: int = 25) -> bytes:
    """``clip`` (T, H, W, 3) uint8 as an H.264 MP4 file, in memory."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
