"""``explain=frames``: a clip's answer with the importance of each of its frames (``models.explain``).

An explained request decodes its upload as /predict does, then runs the encoder once over the clip
and the head once over the clip and its leave-one-out variants, as a job on a decode thread beside
the clip batcher (``app.jobs``): its cost is one encoder pass over T frames and a head call over
T^2 frames, more than a batched /predict of the same clip, and it is bounded by DECODE_TIMEOUT_S.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch

from app.decoding import Decoders
from app.intake import Disconnected
from app.jobs import run_job
from app.preprocess import array_to_clip
from app.runtime import ModelRuntime
from app.served import ServedModel
from app.uploads import Parsed, Stop, Target, Upload, decode_parsed
from models import FusedClassifier
from models.explain import Explanation, occlusion


@dataclass(frozen=True)
class Explained:
    """An explained clip of ``frames`` frames, and how long decoding and the model took."""

    explanation: Explanation
    frames: int
    decode_s: float
    inference_s: float


def explain_clip(model: FusedClassifier, frames: torch.Tensor) -> Explanation:
    """frames (T, C, H, W) uint8 on the CPU -> its explanation."""
    return occlusion(model, frames.to(model.mean.device))


def build_explanation(runtime: ModelRuntime, parsed: Parsed, *, target: Target, stop: Stop) -> Explained:
    """Decode ``parsed`` as /predict does and explain it (blocking: on a decode thread)."""
    started = time.perf_counter()
    clip = array_to_clip(decode_parsed(parsed, target, stop=stop))  # (T, C, H, W)
    decoded = time.perf_counter()
    explanation = runtime.compute(explain_clip, clip)
    return Explained(explanation, clip.shape[0], decoded - started, time.perf_counter() - decoded)


async def explain(
    decoders: Decoders, served: ServedModel, upload: Upload, *, timeout_s: float, disconnected: Disconnected
) -> Explained:
    """``upload`` explained with ``served``'s model within ``timeout_s`` (DECODE_TIMEOUT_S) or ``TimedOut``;
    a client that leaves stops it (``ClientGone``)."""
    work = partial(build_explanation, served.runtime, target=served.target)
    return await run_job(
        decoders, upload, served.target, work, what="explanation", timeout_s=timeout_s, disconnected=disconnected
    )
