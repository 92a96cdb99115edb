"""A long video (or a sequence of frames) -> its timeline: the model's answer on every window of
frames sampled at a steady rate.

The frames are sampled at ``fps`` in one pass over the video (``media.video.SampledVideo``) and
go through the encoder in chunks as they are decoded; only their features (N, D) are kept, so a
sampled frame is decoded and encoded once however many windows it falls in, and memory holds one
chunk of pixels at a time. The head then runs on every window of features, many windows a call.
Both run through the model's runtime beside the clip batcher, as a job on a decode thread
(``app.jobs``: a video's timeline takes its turn among the video decodes, ``DECODE_TIMEOUT_S``
bounds the whole of it, and it stops between frames once its request has ended).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from app.decoding import Decoders
from app.errors import WrongShape
from app.intake import Disconnected
from app.jobs import run_job
from app.preprocess import array_to_clip
from app.runtime import ModelRuntime
from app.served import ServedModel
from app.uploads import Parsed, Stop, Target, Upload, decode_each
from media import Stopped
from media.video import SampledVideo
from models import FusedClassifier

CHUNK = 64  # sampled frames per encoder call, and windows per head call


@dataclass(frozen=True)
class Placement:
    """How a timeline's windows are laid over its sampled frames: ``fps`` frames per second of video,
    ``window`` frames per window, a window starting every ``stride`` frames."""

    fps: float
    window: int
    stride: int

    @classmethod
    def of(cls, target: Target, fps: float, window: int | None = None, stride: int | None = None) -> Placement:
        """The query's placement; a window defaults to the model's clip length, a stride to half a window."""
        window = window or target.clip_frames
        if window > target.limits.max_frames:
            raise WrongShape(f"a window of {window} frames is more than the limit of {target.limits.max_frames}")
        return cls(fps, window, stride or max(1, window // 2))

    def starts(self, frames: int) -> list[int]:
        """The first frame of each window over ``frames`` sampled frames: 0, stride, 2 stride, ... while a
        whole window fits, then one window ending at the last frame if the others leave frames uncovered
        at the end (the end is always in a whole window); one window of all of them if they are fewer."""
        if frames <= self.window:
            return [0]
        starts = list(range(0, frames - self.window + 1, self.stride))
        if starts[-1] + self.window < frames:
            starts.append(frames - self.window)
        return starts


@dataclass(frozen=True)
class Timeline:
    """Windows of ``length`` frames starting at ``starts`` over ``frames`` frames sampled at ``fps`` from
    ``duration_s`` seconds, and each window's probabilities (S, K)."""

    fps: float
    duration_s: float
    frames: int
    starts: list[int]
    length: int
    probabilities: np.ndarray

    def span(self, i: int) -> tuple[float, float]:
        """Window ``i``'s (start_s, end_s): its first frame's time, and its last frame's plus one frame,
        no later than the video's end."""
        start = self.starts[i]
        return round(start / self.fps, 6), round(min((start + self.length) / self.fps, self.duration_s), 6)


def timeline_target(target: Target, max_frames: int) -> Target:
    """``target`` as a timeline decodes to: its format and pixel limit, at most ``max_frames`` frames."""
    return dataclasses.replace(target, limits=dataclasses.replace(target.limits, max_frames=max_frames))


def sampled_frames(
    parsed: Parsed, target: Target, fps: float, stop: Stop
) -> tuple[Iterable[np.ndarray], Callable[[], float]]:
    """The upload's frames sampled at ``fps``, each (H, W, C) uint8 at the model's size, decoded as they
    are iterated; and what gives the seconds they span once iterated. Frames sent as images are taken
    as sampled at ``fps`` already (frame i at time i / fps)."""
    limits = target.limits
    if parsed.video is not None:
        video = SampledVideo(
            parsed.video,
            target.format,
            fps,
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            stop=stop,
            threads=True,  # the codec's own threads, as a lone upload's decode is otherwise one core's
        )
        return video, lambda: video.duration_s or 0.0
    blobs = parsed.images or []
    target.check_count(len(blobs))
    decoded = itertools.chain.from_iterable(
        decode_each(blobs[i : i + CHUNK], target, i, stop) for i in range(0, len(blobs), CHUNK)
    )
    return decoded, lambda: len(blobs) / fps


def chunks(frames: Iterable[np.ndarray], size: int = CHUNK) -> Iterator[torch.Tensor]:
    """Frames (H, W, C) -> clips (n, C, H, W) uint8 of at most ``size`` frames, as they are decoded."""
    it = iter(frames)
    while batch := list(itertools.islice(it, size)):
        yield array_to_clip(np.stack(batch))


def encode(model: FusedClassifier, frames: torch.Tensor) -> torch.Tensor:
    """frames (n, C, H, W) uint8 -> features (n, D), on the model's device."""
    return model.forward_features(frames.to(model.mean.device))


def classify(model: FusedClassifier, feats: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """feats (N, D), starts (B,) -> the probabilities (B, K) float32 on the CPU of the B windows of
    ``length`` frames starting there, in one ragged head call."""
    index = (starts[:, None] + torch.arange(length)).flatten()  # (B * length,)
    windows = feats[index.to(feats.device)]  # (B * length, D): the windows' features, concatenated
    lengths = torch.full((starts.numel(),), length)  # (B,)
    return model.forward_head(windows, lengths).float().softmax(dim=-1).cpu()


def build_timeline(
    runtime: ModelRuntime, parsed: Parsed, *, target: Target, placement: Placement, stop: Stop
) -> Timeline:
    """The timeline of a parsed upload (blocking: on a decode thread). ``target`` holds the timeline's
    limits (``timeline_target``); ``stop`` is asked between frames."""
    frames, duration = sampled_frames(parsed, target, placement.fps, stop)
    parts = [runtime.compute(encode, clip) for clip in chunks(frames)]  # each sampled frame encoded once
    if stop():
        raise Stopped("the timeline is no longer wanted")
    feats = torch.cat(parts)  # (N, D)
    count = feats.shape[0]
    starts = placement.starts(count)
    length = min(placement.window, count)
    probs = [
        runtime.compute(classify, feats, torch.tensor(starts[i : i + CHUNK]), length)
        for i in range(0, len(starts), CHUNK)
    ]
    return Timeline(placement.fps, duration(), count, starts, length, torch.cat(probs).numpy())


async def timeline(
    decoders: Decoders,
    served: ServedModel,
    upload: Upload,
    placement: Placement,
    *,
    max_frames: int,
    timeout_s: float,
    disconnected: Disconnected,
) -> Timeline:
    """The timeline of ``upload`` with ``served``'s model, at most ``max_frames`` sampled frames
    (MAX_TIMELINE_FRAMES), done within ``timeout_s`` (DECODE_TIMEOUT_S) or ``TimedOut``; a client that
    leaves stops it (``ClientGone``)."""
    target = timeline_target(served.target, max_frames)
    work = partial(build_timeline, served.runtime, target=target, placement=placement)
    return await run_job(
        decoders, upload, target, work, what="timeline", timeout_s=timeout_s, disconnected=disconnected
    )
