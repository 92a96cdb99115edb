"""Real servers over real sockets, and real encoded media written by the tests.

``live_server`` runs uvicorn in a thread of the test process (a real HTTP server on a
free port); ``spawn_server`` runs ``python -m app`` as a subprocess (for signals).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from app.main import create_app
from app.settings import Settings
from models import (
    AttentionHeadConfig,
    InputSpec,
    ModelConfig,
    ResNetConfig,
    SmallCNNConfig,
    build_model,
    default_checkpoint,
    save_checkpoint,
)
from training.synth import LABELS, SynthConfig, load_digit_splits, render_clip


@contextlib.contextmanager
def live_server(**settings: Any) -> Iterator[str]:
    """Serve ``create_app(Settings(**settings))`` with uvicorn on a free port; yields the base URL."""
    app = create_app(Settings(port=0, **settings))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawn_server(
    *flags: str, env: dict[str, str] | None = None, sigint_ignored: bool = False, new_session: bool = False
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m app`` in a subprocess on a free port; yields (process, base URL) once ready.
    ``sigint_ignored``: started with SIGINT ignored, as a shell starts a background job;
    ``new_session``: in a process group of its own (with its children), to signal as a terminal does."""
    port = free_port()
    cmd = [sys.executable, "-m", "app", "--port", str(port), *flags]
    if sigint_ignored:  # the shell execs python in its place: same pid, SIGINT still ignored
        cmd = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *cmd]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        # one client for the whole wait: each bare httpx.get builds an SSL context (~40 ms of CPU),
        # which at 10 polls a second took a third of a core from the starting server
        with httpx.Client(timeout=1) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


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


@pytest.fixture(scope="session")
def default_ckpt() -> Path:
    return default_checkpoint()


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model slow enough (about 45 ms per 8-frame clip here) that requests pile up behind it."""
    cfg = ModelConfig(
        len(LABELS), ResNetConfig(widths=(32, 64, 128), blocks_per_stage=2), AttentionHeadConfig(dim=64), image_size=64
    )
    path = tmp_path_factory.mktemp("slow") / "slow.safetensors"
    save_checkpoint(
        path,
        build_model(cfg).eval(),
        name="slow",
        labels=list(LABELS),
        input_spec=InputSpec.for_model(cfg, frames=8, min_frames=1, max_frames=16),
    )
    return path


@pytest.fixture(scope="session")
def two_model_dir(tmp_path_factory: pytest.TempPathFactory, default_ckpt: Path) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    (folder / default_ckpt.name).write_bytes(default_ckpt.read_bytes())
    cfg = ModelConfig(3, SmallCNNConfig(widths=(8, 16)), AttentionHeadConfig(dim=16, heads=2), image_size=24)
    save_checkpoint(
        folder / "tiny.safetensors",
        build_model(cfg).eval(),
        name="tiny",
        version="7",
        labels=["a", "b", "c"],
        input_spec=InputSpec.for_model(cfg, frames=4, min_frames=1, max_frames=8),
    )
    return folder


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == name or (want and key.startswith(name + "{") and all(p in key for p in want.split(","))):
                total += float(value)
    return total
