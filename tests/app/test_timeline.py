"""Timelines in process (app.timeline): where windows go, each sampled frame through the encoder once
with the same answers as running every window whole, a stop between frames, and a video's turn
among the video decodes."""

from __future__ import annotations

import math
import threading
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.decoding import Decoders
from app.jobs import submit
from app.runtime import ModelRuntime
from app.timeline import Placement, build_timeline, timeline_target
from app.uploads import Parsed, Upload, image_frames
from media import Stopped, WrongShape
from models import load_checkpoint
from tests.support.clips import target_of
from tests.support.media import encode, multipart_frames, synth_clip, write_mp4


class EncoderCount:
    """Counts the encoder's calls and the frames it is given, through a forward hook on the real encoder."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.calls = self.frames = 0
        runtime.checkpoint.model.encoder.register_forward_hook(self._seen)

    def _seen(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.calls += 1
        self.frames += args[0].shape[0]


@pytest.fixture
def runtime(default_ckpt: Path) -> ModelRuntime:
    return ModelRuntime(load_checkpoint(default_ckpt), torch.device("cpu"))


def never() -> bool:
    return False


@pytest.mark.parametrize(
    ("frames", "window", "stride", "starts"),
    [
        (28, 16, 8, [0, 8, 12]),  # the last window ends at the last frame
        (24, 16, 8, [0, 8]),  # the windows cover every frame: none added
        (16, 16, 8, [0]),
        (5, 16, 8, [0]),  # fewer frames than a window: one window of all of them
        (10, 4, 3, [0, 3, 6]),
        (11, 4, 3, [0, 3, 6, 7]),
        (6, 2, 5, [0, 4]),  # a stride past the window skips frames, but the last ones are covered
        (5, 1, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_window_starts(frames: int, window: int, stride: int, starts: list[int]) -> None:
    assert Placement(8.0, window, stride).starts(frames) == starts


def test_placement_defaults_and_the_window_limit(runtime: ModelRuntime) -> None:
    target = target_of(runtime.spec, max_frames=20)
    assert Placement.of(target, 8.0) == Placement(8.0, runtime.spec.frames, runtime.spec.frames // 2)
    assert Placement.of(target, 8.0, window=1) == Placement(8.0, 1, 1)
    assert Placement.of(target, 8.0, window=20, stride=3) == Placement(8.0, 20, 3)
    with pytest.raises(WrongShape, match="more than the limit of 20"):
        Placement.of(target, 8.0, window=21)


def test_each_frame_is_encoded_once_and_every_window_answers_as_run_whole(runtime: ModelRuntime) -> None:
    clip = np.concatenate([synth_clip("left", frames=40, seed=1), synth_clip("down", frames=30, seed=2)])
    blobs = [encode(f, "PNG") for f in clip]
    target = timeline_target(target_of(runtime.spec), 1000)
    count = EncoderCount(runtime)
    result = build_timeline(runtime, Parsed(images=blobs), target=target, placement=Placement(4.0, 16, 1), stop=never)
    assert (count.frames, count.calls) == (70, 2)  # 70 frames in chunks of 64, for 55 windows
    assert result.frames == 70 and result.starts == list(range(55)) and result.duration_s == 17.5
    frames = torch.from_numpy(image_frames(blobs, target)).permute(0, 3, 1, 2)  # (T, C, H, W)
    with torch.inference_mode():
        whole = torch.cat([runtime.checkpoint.model(frames[s : s + 16], torch.tensor([16])) for s in result.starts])
    np.testing.assert_allclose(result.probabilities, whole.softmax(-1).numpy(), atol=1e-5)
    assert result.span(54) == (13.5, 17.5)


def test_a_video_is_encoded_once_per_sampled_frame(runtime: ModelRuntime) -> None:
    video = write_mp4(synth_clip("up", frames=120, seed=3, size=64), fps=24)  # 5 s
    count = EncoderCount(runtime)
    target = timeline_target(target_of(runtime.spec), 1000)
    result = build_timeline(runtime, Parsed(video=video), target=target, placement=Placement(30.0, 8, 2), stop=never)
    assert result.frames == 150 and result.duration_s == pytest.approx(5.0)
    assert (count.frames, count.calls) == (150, math.ceil(150 / 64))
    assert len(result.starts) == (150 - 8) // 2 + 1


def test_a_timeline_stops_between_frames(runtime: ModelRuntime) -> None:
    blobs = [encode(f, "PNG") for f in synth_clip("left", frames=150, seed=4)]
    count = EncoderCount(runtime)
    target = timeline_target(target_of(runtime.spec, max_frames=1000), 1000)
    with pytest.raises(Stopped):
        build_timeline(
            runtime, Parsed(images=blobs), target=target, placement=Placement(8.0, 16, 8), stop=lambda: count.calls > 0
        )
    assert count.frames == 64  # the first chunk; the second stopped at its first frame


def test_a_video_timeline_waits_its_turn_among_video_decodes(runtime: ModelRuntime) -> None:
    """With two decode threads, one video decodes at a time: a video timeline waits in line without a
    thread, and a timeline of frames goes on meanwhile."""
    decoders = Decoders(2)
    try:
        assert decoders.videos.admit(lambda: None)  # a video decode holds the one video turn
        target = timeline_target(target_of(runtime.spec), 1000)
        work = partial(build_timeline, runtime, target=target, placement=Placement(8.0, 4, 4), stop=never)
        video = write_mp4(synth_clip("up", frames=12, seed=5), fps=24)
        body, content_type = form({"video": ("v.mp4", video, "video/mp4")})
        waiting = submit(decoders, Upload("form", body, content_type), target, work, never)
        body, content_type = form(multipart_frames([encode(f, "PNG") for f in synth_clip("up", frames=6)], "png"))
        frames = submit(decoders, Upload("form", body, content_type), target, work, never)
        assert frames.result(timeout=30).frames == 6
        assert not waiting.done() and len(decoders.videos.waiting) == 1
        finished = threading.Event()
        decoders.videos.run(finished.set)  # the video decode ends: its thread runs the one waiting
        assert finished.is_set() and waiting.result(timeout=0).frames == 4
    finally:
        decoders.shutdown()


def form(files: object) -> tuple[bytes, str]:
    """A multipart body and its content type, as httpx sends ``files``."""
    request = httpx.Request("POST", "http://x/", files=files)  # type: ignore[arg-type]
    return request.read(), request.headers["content-type"]
