"""Which frames of a longer clip or video make up the model's clip: one per equal segment (TSN)."""

from __future__ import annotations

import numpy as np


def sample_indices(
    length: int,
    frames: int,
    *,
    train: bool = False,
    rng: np.random.Generator | None = None,
    repeat: bool = False,
    offset: float | None = None,
) -> np.ndarray:
    """Pick ``frames`` frame indices out of ``length``, one per equal segment.

    Training takes a random position in each segment; evaluation and serving its centre (or
    ``offset`` in [0, 1) for multi-clip evaluation). A clip of ``frames`` or fewer keeps all
    its frames, or with ``repeat`` repeats them to fill ``frames``.
    """
    if length <= frames and not repeat:
        return np.arange(length)
    edges = np.linspace(0, length, frames + 1)
    if train:
        where = (rng or np.random.default_rng()).random(frames)
    else:
        where = np.full(frames, 0.5 if offset is None else offset)
    picks = edges[:-1] + where * (edges[1:] - edges[:-1])
    return np.minimum(picks.astype(np.int64), length - 1)
