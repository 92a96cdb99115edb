"""Jobs for the decode-process tests, in a module of their own: a spawned decode process imports
this (numpy and ``app.uploads``), not the test module with everything a test imports."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from app.uploads import Target, image_frames
from media import BadInput


def crash_once(marker: str, blobs: list[bytes], limits: Target) -> np.ndarray:
    """Die the first time (``marker`` does not exist yet), decode after that."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return image_frames(blobs, limits)


def crash_always(blobs: list[bytes], limits: Target) -> np.ndarray:
    os._exit(1)


def slow_frames(delay_s: float, blobs: list[bytes], limits: Target) -> np.ndarray:
    """Decode after ``delay_s``: a job still running when another process dies."""
    time.sleep(delay_s)
    return image_frames(blobs, limits)


def raise_bad_input(blobs: list[bytes], limits: Target) -> np.ndarray:
    raise BadInput("frame 0 is not a decodable image (planted)")
