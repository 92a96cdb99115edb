"""An encoded video -> the uint8 (T, H, W, C) frames a model takes, sampled from it by PyAV.

Two ways through a video, with the same decoder and the same resize (libswscale, to the
model's size, as each frame is decoded):
- ``seek=False`` (serving an upload): decode every frame, then pick; the frame count comes
  from the frames themselves, whatever the container's header claims;
- ``seek=True`` (training on files): take the count from the header, pick, and seek to the
  keyframe before each target that lies far ahead instead of decoding the whole file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from media.errors import BadInput, InputError, TooLarge, UnsupportedMedia
from media.spec import FrameFormat

Pick = Callable[[int], Sequence[int] | np.ndarray]  # frame count -> the indices to keep, in order
MAX_DECODED = 10_000  # frames one upload may decode


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # the `video` extra is not installed
        raise UnsupportedMedia("video input needs PyAV (pip install fusionserve[video])") from exc
    return av


def decode_video(
    source: bytes | Path,
    fmt: FrameFormat,
    pick: Pick,
    *,
    max_pixels: int = 1 << 31,
    seek: bool = False,
    max_decoded: int = MAX_DECODED,
) -> np.ndarray:
    """The frames ``pick(frame count)`` chooses, uint8 (T, H, W, C) at ``fmt``'s size.

    Raises ``BadInput`` for a file that does not decode, ``TooLarge`` past ``max_pixels`` per frame
    or ``max_decoded`` frames, ``UnsupportedMedia`` without PyAV.
    """
    av = _av()
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r") as container:
            if not container.streams.video:
                raise BadInput("the video has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise TooLarge(f"video frames are {w}x{h}, more than {max_pixels} pixels")
            if seek:
                frames = _seek_frames(container, stream, fmt, pick)
            else:
                stream.thread_type = "AUTO"
                frames = _scan_frames(container.decode(stream), fmt, pick, max_decoded)
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise BadInput(f"the video could not be decoded ({exc})") from exc
    arr = np.stack(frames)
    return arr[..., None] if arr.ndim == 3 else arr


def _resized(frame: Any, fmt: FrameFormat) -> np.ndarray:
    return frame.reformat(
        width=fmt.width, height=fmt.height, format="rgb24" if fmt.channels == 3 else "gray"
    ).to_ndarray()


def _scan_frames(decoded: Iterator[Any], fmt: FrameFormat, pick: Pick, max_decoded: int) -> list[np.ndarray]:
    frames = []
    for frame in decoded:
        frames.append(_resized(frame, fmt))
        if len(frames) > max_decoded:
            raise TooLarge(f"the video has more than {max_decoded} frames")
    if not frames:
        raise BadInput("the video has no decodable frames")
    return [frames[int(i)] for i in pick(len(frames))]


def stream_length(container: Any) -> int:
    """Frames in the first video stream, from its header, else from the stream's or the container's duration."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if stream.frames:
        return int(stream.frames)
    if stream.duration and rate:
        return int(stream.duration * stream.time_base * rate)
    if container.duration and rate:  # WebM/MKV often only know the container's duration (microseconds)
        return round(container.duration / 1_000_000 * rate)
    return 0


def video_length(path: Path) -> int:
    """Frames in a video file's first video stream, from its header (0 when unknown)."""
    with _av().open(str(path)) as container:
        return stream_length(container)


def _seek_frames(container: Any, stream: Any, fmt: FrameFormat, pick: Pick) -> list[np.ndarray]:
    """Decode only the picked frames: a target more than two seconds ahead is reached by seeking to
    the keyframe before it; a truncated tail repeats the last frame decoded."""
    rate = stream.average_rate or stream.guessed_rate
    if rate is None or stream.time_base is None:
        raise BadInput("the video has no frame rate or time base")
    length = stream_length(container)
    if length <= 0:
        raise BadInput("the video has no frames")
    wanted = [int(t) for t in pick(length)]
    start = stream.start_time or 0
    per_frame = 1 / (rate * stream.time_base)  # pts units per frame
    got: dict[int, np.ndarray] = {}
    position = -1  # the last decoded frame; decoding starts at the beginning
    frames = container.decode(stream)
    for target in sorted(set(wanted)):
        if target - position > 2 * float(rate):  # far ahead: seek to the keyframe before it
            container.seek(int(start + target * per_frame), stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            position = round((frame.pts - start) / per_frame) if frame.pts is not None else position + 1
            if position >= target:
                got[target] = _resized(frame, fmt)
                break
    if not got:
        raise BadInput("no frame of the video could be decoded")
    last = got[max(got)]
    return [got.get(t, last) for t in wanted]
