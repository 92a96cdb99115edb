"""Videos to frames (media.video): only the sampled frames' share decoded, the same frames as decoding
every one, each frame held to the pixel limit before it is converted, a bound on frames decoded, and
a stop between frames."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

from media import FrameFormat, Stopped, TooLarge, decode_video, sample_indices
from tests.support.media import jpeg, mjpeg, write_video

FMT = FrameFormat(24, 32, 3)


def numbered(count: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """Frames whose brightness is their index times 2 (more apart than a codec's error)."""
    return np.stack([np.full((*size, 3), 2 * (t % 120), np.uint8) for t in range(count)])


def every_frame(path: Path) -> list[np.ndarray]:
    """The reference: every frame decoded in order and resized, as a plain PyAV loop does it."""
    with av.open(str(path)) as container:
        return [
            f.reformat(width=FMT.width, height=FMT.height, format="rgb24").to_ndarray()
            for f in container.decode(container.streams.video[0])
        ]


@pytest.mark.parametrize(("suffix", "count"), [(".mp4", 120), (".webm", 40), (".mkv", 90), (".avi", 30)])
def test_sampled_frames_equal_those_of_decoding_every_frame(tmp_path: Path, suffix: str, count: int) -> None:
    path = write_video(tmp_path / f"v{suffix}", numbered(count), fps=5)
    reference = every_frame(path)
    for wanted in (4, 16, count + 5):
        got = decode_video(path, FMT, lambda n, w=wanted: sample_indices(n, w))
        picks = sample_indices(len(reference), wanted)
        assert got.shape == (len(picks), FMT.height, FMT.width, 3)
        np.testing.assert_array_equal(got, np.stack([reference[i] for i in picks]))


def test_seeking_decodes_a_share_of_a_long_video(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", numbered(400), fps=5)  # a keyframe every 4 frames
    got = decode_video(path, FMT, lambda n: sample_indices(n, 8), max_decoded=8 * 4)  # 8 targets, a GOP each
    assert got.shape[0] == 8
    with pytest.raises(TooLarge, match="more than 20 frames decoded"):
        decode_video(path, FMT, lambda n: np.arange(n), max_decoded=20)


def test_a_frame_past_the_pixel_limit_is_refused_though_the_header_is_small() -> None:
    video = mjpeg([jpeg(16, 16)] * 2 + [jpeg(2000, 2000)] * 3)
    assert decode_video(video, FMT, lambda n: np.arange(n)).shape[0] == 5  # no limit: all five
    with pytest.raises(TooLarge, match="1000000 pixels"):
        decode_video(video, FMT, lambda n: np.arange(n), max_pixels=1000 * 1000)
    ok = decode_video(video, FMT, lambda n: np.arange(2), max_pixels=1000 * 1000)  # only small frames sampled
    assert ok.shape[0] == 2


def h264(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_an_h264_stream_that_grows_mid_stream_is_refused_at_the_large_frame() -> None:
    small, large = h264(numbered(4, (64, 64))), h264(numbered(1, (1024, 1032)))
    video = small + large  # a raw stream: new parameter sets, then frames of the new size
    assert decode_video(video, FMT, lambda n: np.arange(n)).shape[0] == 5
    with pytest.raises(TooLarge):
        decode_video(video, FMT, lambda n: np.arange(n), max_pixels=1024 * 1024)


def test_a_stop_ends_the_decode_between_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", numbered(60), fps=5)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3  # wanted for three frames, then no more

    with pytest.raises(Stopped):
        decode_video(path, FMT, lambda n: np.arange(n), stop=stop)
    assert len(asked) == 4
