"""A video sampled at a rate in one pass (media.video.SampledVideo): the frame on screen at each
sample time, as decoding every frame gives it, over MP4, WebM, MKV and AVI; the sampled-frame
limit from the header and while decoding; the pixel limit on every frame; a stop between frames."""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
import numpy as np
import pytest

from media import BadInput, FrameFormat, Stopped, TooLarge
from media.video import SampledVideo
from tests.support.media import jpeg, mjpeg, write_video

FMT = FrameFormat(24, 32, 3)


def numbered(count: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Frames whose brightness is their index times 2 (more apart than a codec's error)."""
    return np.stack([np.full((*size, 3), 2 * (t % 120), np.uint8) for t in range(count)])


def every_frame(source: Path | bytes) -> list[np.ndarray]:
    """The reference: every frame decoded in order and resized, as a plain PyAV loop does it."""
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        return [
            f.reformat(width=FMT.width, height=FMT.height, format="rgb24").to_ndarray()
            for f in container.decode(container.streams.video[0])
        ]


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".avi"])
@pytest.mark.parametrize("fps", [2.0, 5.0, 7.5, 12.0])
def test_each_sample_is_the_frame_on_screen_at_its_time(tmp_path: Path, suffix: str, fps: float) -> None:
    path = write_video(tmp_path / f"v{suffix}", numbered(30), fps=5)  # 6 s
    reference = every_frame(path)
    video = SampledVideo(path.read_bytes(), FMT, fps)
    got = list(video)
    assert video.duration_s == pytest.approx(6.0)
    assert len(got) == math.ceil(6.0 * fps)  # times 0, 1/fps, ... before the end
    for k, frame in enumerate(got):
        np.testing.assert_array_equal(frame, reference[math.floor(k / fps * 5 + 1e-9)])


def test_past_max_frames_from_the_header_before_any_frame_is_decoded(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", numbered(50), fps=5)  # 10 s
    asked: list[int] = []
    video = SampledVideo(path, FMT, 3.0, max_frames=29, stop=lambda: bool(asked.append(1)))
    with pytest.raises(TooLarge, match="10 s of video at 3 frames per second is more than the limit of 29"):
        next(iter(video))
    assert asked == []
    assert len(list(SampledVideo(path, FMT, 3.0, max_frames=30))) == 30


def h264(frames: np.ndarray, fps: int = 10) -> bytes:
    """A raw H.264 stream: no header duration, no timestamps; the decoder gives each frame's duration."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_a_stream_without_duration_or_timestamps_is_timed_by_its_frames() -> None:
    raw = h264(numbered(40))  # 4 s at 10 fps
    video = SampledVideo(raw, FMT, 5.0)
    got = list(video)
    assert len(got) == 20 and video.duration_s == pytest.approx(4.0)
    reference = every_frame(raw)
    for k, frame in enumerate(got):
        np.testing.assert_array_equal(frame, reference[2 * k])
    with pytest.raises(TooLarge, match="the video at 5 frames per second is more than the limit of 19"):
        list(SampledVideo(raw, FMT, 5.0, max_frames=19))


def test_every_decoded_frame_is_held_to_the_pixel_limit() -> None:
    """Every frame is decoded (one pass), so a large frame between two samples is refused too."""
    video = mjpeg([jpeg(16, 16)] * 2 + [jpeg(2000, 2000)] + [jpeg(16, 16)] * 7)
    assert len(list(SampledVideo(video, FMT, 10.0))) == 10
    with pytest.raises(TooLarge, match="1000000 pixels"):
        list(SampledVideo(video, FMT, 1.0, max_pixels=1000 * 1000))


def test_a_stop_ends_the_decode_between_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", numbered(60), fps=5)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Stopped):
        list(SampledVideo(path, FMT, 5.0, stop=stop))
    assert len(asked) == 4


def test_what_is_not_a_video_is_bad_input() -> None:
    with pytest.raises(BadInput):
        list(SampledVideo(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 300, FMT, 8.0))
    with pytest.raises(ValueError, match="fps must be positive"):
        SampledVideo(b"", FMT, 0.0)
