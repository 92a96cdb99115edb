"""Decoded pixels as tensors: one clip (T, C, H, W) uint8, channels-last in memory.

``app.decode`` turns uploads into arrays (T, H, W, C) without torch; these wrap them
for the batcher, and resize KServe tensors that arrive already decoded.
"""

from __future__ import annotations

import numpy as np
import torch

from app.decode import InputLimits, image_frames, video_frames


def array_to_clip(array: np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (T, C, H, W), channels-last strides, no copy."""
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def frames_to_clip(frames: list[np.ndarray]) -> torch.Tensor:
    """[(H, W, C) uint8] -> (T, C, H, W) uint8, channels-last in memory (no copy of pixels twice)."""
    return array_to_clip(np.stack(frames))


def decode_images(blobs: list[bytes], limits: InputLimits) -> torch.Tensor:
    return array_to_clip(image_frames(blobs, limits))


def decode_video(data: bytes, limits: InputLimits, frames: int | None = None) -> torch.Tensor:
    return array_to_clip(video_frames(data, limits, frames))


def tensor_to_clips(array: np.ndarray, limits: InputLimits) -> list[torch.Tensor]:
    """A validated KServe ``frames`` tensor uint8 (B, T, H, W, C) -> B clips (T, C, H', W') at the model's size.

    Frames of another size are resized one clip at a time, so the float copy stays one clip large.
    """
    height, width = array.shape[2:4]
    clips = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 1, 4, 2, 3)  # (B, T, C, H, W)
    if (limits.height, limits.width) == (height, width):
        return list(clips.unbind(0))
    resized = []
    for clip in clips.unbind(0):  # (T, C, H, W)
        out = torch.nn.functional.interpolate(
            clip.float(), size=(limits.height, limits.width), mode="bilinear", antialias=True, align_corners=False
        )
        resized.append(out.round().clamp(0, 255).to(torch.uint8))
    return resized
