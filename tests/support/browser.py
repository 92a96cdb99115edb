"""Chromium for the page's tests: where its binary is, how it is launched (a fake camera, playing a
Y4M file the tests write, with the permission prompt answered yes), and that Y4M file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Browser, Playwright

MISSING = "Chromium is not installed: apt-get install chromium; .ci/run installs it"


def chromium_path() -> str | None:
    """``FUSIONSERVE_CHROMIUM`` (a path or a command name), else ``chromium`` on the PATH; None if neither."""
    given = os.environ.get("FUSIONSERVE_CHROMIUM")
    if given:
        return given if Path(given).is_file() else shutil.which(given)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright: Playwright, executable: str, camera: Path | None = None) -> Browser:
    """Headless Chromium whose camera is fake (``camera``: a Y4M file it plays in a loop)."""
    args = [
        "--no-sandbox",  # the tests run as root, where Chromium's sandbox refuses to start
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
    ]
    if camera is not None:
        args.append(f"--use-file-for-fake-video-capture={camera}")
    return playwright.chromium.launch(executable_path=executable, args=args)


def write_y4m(path: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """uint8 RGB frames (T, H, W, 3), H and W even, as a Y4M file: 4:2:0, full-range (JPEG) YCbCr."""
    _, height, width, _ = frames.shape
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            ycc = np.asarray(Image.fromarray(frame).convert("YCbCr"), dtype=np.float32)
            chroma = ycc[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
            out.write(b"FRAME\n")
            for plane in (ycc[..., 0], chroma[..., 0], chroma[..., 1]):
                out.write(np.round(plane).astype(np.uint8).tobytes())
    return path
