"""Decoded pixels as the model's input: uint8 clips (T, C, H, W), channels-last in memory.

The decoders (``app.uploads``, ``media``) give arrays (T, H, W, C) without torch; these wrap
them for the batcher without a copy, and resize KServe tensors that arrive decoded already.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from media import FrameFormat


def array_to_clip(array: np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (T, C, H, W), channels-last strides, no copy."""
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def tensor_to_clips(array: np.ndarray, fmt: FrameFormat) -> list[torch.Tensor]:
    """A validated KServe ``frames`` tensor uint8 (B, T, H, W, C) -> B clips (T, C, H', W') at ``fmt``'s size.
    Clips at the model's size are views of ``array`` (for binary data, of the request body itself), so a
    batch's one copy is the batcher's, into pinned memory on CUDA.

    Frames of another size are resized one clip at a time, so the float copy stays one clip large.
    """
    height, width = array.shape[2:4]
    with warnings.catch_warnings():  # a view of the request body's bytes, read-only: the clips are only read
        warnings.simplefilter("ignore", UserWarning)
        clips = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 1, 4, 2, 3)  # (B, T, C, H, W)
    if (fmt.height, fmt.width) == (height, width):
        return list(clips.unbind(0))
    resized = []
    for clip in clips.unbind(0):  # (T, C, H, W)
        out = torch.nn.functional.interpolate(
            clip.float(), size=(fmt.height, fmt.width), mode="bilinear", antialias=True, align_corners=False
        )
        resized.append(out.round().clamp(0, 255).to(torch.uint8))
    return resized
