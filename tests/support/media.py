"""Real encoded media written by the tests: moving-digits clips as JPEG/PNG bytes or files, and
MP4/WebM videos from PyAV's encoders."""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from training.synth import SynthConfig, load_digit_splits, render_clip


def synth_clip(label: str = "left", frames: int = 12, seed: int = 0, size: int = 32) -> np.ndarray:
    """A moving-digits clip, uint8 (T, S, S, 3)."""
    cfg = SynthConfig(canvas=size, min_frames=frames, max_frames=frames)
    digit = load_digit_splits(0)["test"][seed % 50]
    return render_clip(label, digit, cfg, np.random.default_rng(seed))


def encode(frame: np.ndarray, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt, **kw)
    return buf.getvalue()


def multipart_frames(frames: list[bytes], fmt: str = "jpeg") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("frames", (f"{i:03d}.{fmt}", data, f"image/{fmt}")) for i, data in enumerate(frames)]


def write_mp4(frames: np.ndarray, codec: str = "libx264", fps: int = 10) -> bytes:
    """Encode (T, H, W, 3) uint8 frames as an MP4 file in memory with PyAV."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


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


def claim_size(data: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) claiming another size: a bomb behind a small file."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    raise AssertionError("no frame header")


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: chroma and fine detail that a wrong decode would change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


def mjpeg(frames: list[bytes]) -> bytes:
    """An MJPEG AVI whose packets are these JPEGs, of whatever sizes (the header says the first's)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuvj420p"
        for i, data in enumerate(frames):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 10)
            container.mux(packet)
    return buf.getvalue()


def jpeg(width: int, height: int) -> bytes:
    """A plain JPEG of this size."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()
