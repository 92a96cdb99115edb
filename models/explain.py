"""Which frames of a clip drove its answer: occlusion (leave one frame out) and attention pooling.

A frame's importance is how much the predicted class's probability falls when that frame is left
out of the clip. The encoder sees each frame once; the head then runs on the whole clip and its T
leave-one-out variants (T - 1 frames each) as one ragged batch of 1 + T clips, so an explanation
costs one encoder pass over T frames and one head call over T^2 frames, not T forward passes.
A clip of one frame has nothing to leave out beside it: its frame's importance is its predicted
probability above the uninformed 1 / K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.classifier import FusedClassifier


@dataclass(frozen=True)
class Explanation:
    """A clip's probabilities (K,), the importance of each of its T frames (T,), and attention
    pooling's weight of each frame (T,) where the head pools that way (else None); float32, CPU."""

    probabilities: torch.Tensor
    importance: torch.Tensor
    attention: torch.Tensor | None


def leave_one_out(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frames of a clip of T frames followed by its T leave-one-out variants, as one ragged batch:
    the frame index of each of its T + T (T - 1) rows, and the 1 + T clips' lengths."""
    keep = ~torch.eye(T, dtype=torch.bool)  # (T, T): row i keeps every frame but i
    variants = torch.arange(T).expand(T, T)[keep]  # (T * (T - 1),), each variant's frames in order
    index = torch.cat([torch.arange(T), variants])
    lengths = torch.tensor([T] + [T - 1] * T) if T > 1 else torch.tensor([1])
    return index, lengths


@torch.no_grad()
def occlusion(model: FusedClassifier, frames: torch.Tensor) -> Explanation:
    """frames: (T, C, H, W) of one clip (uint8 or float, on the model's device) -> its explanation."""
    T = frames.shape[0]
    assert T >= 1, "a clip needs at least one frame"
    feats = model.forward_features(frames)  # (T, D): each frame encoded once
    index, lengths = leave_one_out(T)
    probs = model.forward_head(feats[index.to(feats.device)], lengths).float().softmax(dim=-1).cpu()  # (1+T, K)
    full = probs[0]
    predicted = int(full.argmax())
    if T == 1:
        importance = full[predicted : predicted + 1] - 1.0 / full.numel()
    else:
        importance = full[predicted] - probs[1:, predicted]  # (T,)
    weights = model.head.pooling_weights(feats[None], torch.tensor([T], device=feats.device))
    attention = None if weights is None else weights[0].float().cpu()
    return Explanation(full, importance, attention)
