"""The server's own decoding and the model, in process: what an answer over HTTP must equal."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from app.preprocess import array_to_clip
from app.uploads import Target, image_frames, video_frames
from media import FrameFormat, Limits
from models import Checkpoint, InputSpec, load_checkpoint


def target_of(spec: InputSpec, max_frames: int = 64, max_pixels: int = 4096 * 4096) -> Target:
    return Target(FrameFormat.of(spec), spec.frames, Limits(max_frames, max_pixels))


def images_clip(blobs: list[bytes], target: Target) -> torch.Tensor:
    """Encoded frames -> (T, C, H, W) uint8, as the server decodes them."""
    return array_to_clip(image_frames(blobs, target))


def video_clip(data: bytes, target: Target, frames: int | None = None) -> torch.Tensor:
    return array_to_clip(video_frames(data, target, frames))


class Reference(NamedTuple):
    ckpt: Checkpoint
    target: Target

    def probs(self, clip: torch.Tensor) -> np.ndarray:
        """One clip through the model alone: (K,) probabilities."""
        with torch.inference_mode():
            return self.ckpt.model(clip, torch.tensor([clip.shape[0]])).softmax(-1)[0].numpy()


def reference(path: Path) -> Reference:
    ckpt = load_checkpoint(path)
    return Reference(ckpt, target_of(ckpt.input))


def check_answer(body: dict, expected: np.ndarray, labels: list[str], frames: int) -> None:  # type: ignore[type-arg]
    """A /predict answer: these probabilities, their label and top-k, this many frames, the timings."""
    got = np.array([body["probabilities"][label] for label in labels])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert body["label"] == labels[int(expected.argmax())]
    assert body["frames"] == frames
    assert [t["label"] for t in body["top_k"]] == [labels[i] for i in np.argsort(-expected, kind="stable")[:5]]
    assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
