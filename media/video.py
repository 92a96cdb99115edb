"""An encoded video -> the uint8 (T, H, W, C) frames a model takes, sampled from it by PyAV.

The video's packets are read first without decoding them (cheap): they give the frame count and
where the keyframes are. Then only what the sampled frames need is decoded: from the keyframe
before each one, seeking past the rest. Each frame is checked against the pixel limit before it is
converted (libav refuses a larger picture before it allocates it), the frames decoded per call are
bounded, and ``stop`` is asked between frames, so a decode whose request has ended stops at once.
Training and serving read videos here alike.
"""

from __future__ import annotations

import bisect
import io
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg

from media.errors import BadInput, InputError, Stopped, TooLarge, UnsupportedMedia
from media.spec import FrameFormat

Pick = Callable[[int], Sequence[int] | np.ndarray]  # frame count -> the indices to keep, in order
Stop = Callable[[], bool]  # true once the work is no longer wanted
MAX_DECODED = 10_000  # frames one call may decode


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # the `video` extra is not installed
        raise UnsupportedMedia("video input needs PyAV (pip install fusionserve[video])") from exc
    return av


@dataclass
class _Reader:
    """One open video stream and what may be spent decoding it."""

    container: Any
    stream: Any
    fmt: FrameFormat
    max_pixels: int
    max_decoded: int
    stop: Stop | None
    decoded: int = 0

    def frames(self) -> Any:
        """Decoded frames from the container's position, each checked and counted."""
        for packet in self.container.demux(self.stream):
            for frame in self._decoded(packet):
                if self.stop is not None and self.stop():
                    raise Stopped("the decode is no longer wanted")
                self.decoded += 1
                if self.decoded > self.max_decoded:
                    raise TooLarge(f"the video needs more than {self.max_decoded} frames decoded")
                self.check(frame.width, frame.height)
                yield frame

    def _decoded(self, packet: Any) -> list[Any]:
        """``packet``'s frames. A decoder that refuses a picture past the limit (libav's max_pixels) says
        so only as an error; the size it was given tells that from a corrupt packet."""
        try:
            return list(packet.decode())
        except _av().error.FFmpegError:
            self.check(self.stream.codec_context.width, self.stream.codec_context.height)
            if self.stream.codec_context.name == "mjpeg" and packet.size:
                height, width = simplejpeg.decode_jpeg_header(bytes(packet))[:2]
                self.check(width, height)
            raise

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise TooLarge(f"a video frame is {width}x{height}, more than {self.max_pixels} pixels")

    def resized(self, frame: Any) -> np.ndarray:
        fmt = self.fmt
        return frame.reformat(
            width=fmt.width, height=fmt.height, format="rgb24" if fmt.channels == 3 else "gray"
        ).to_ndarray()


def decode_video(
    source: bytes | Path,
    fmt: FrameFormat,
    pick: Pick,
    *,
    max_pixels: int = 1 << 31,
    max_decoded: int = MAX_DECODED,
    stop: Stop | None = None,
    threads: bool = False,
) -> np.ndarray:
    """The frames ``pick(frame count)`` chooses, uint8 (T, H, W, C) at ``fmt``'s size; ``threads``: the
    codec decodes on threads of its own (serving; training's loader workers run in parallel already).

    Raises ``BadInput`` for a file that does not decode, ``TooLarge`` past ``max_pixels`` in a frame or
    ``max_decoded`` frames decoded, ``UnsupportedMedia`` without PyAV, ``Stopped`` once ``stop()`` is true.
    """
    av = _av()
    try:
        with _open(av, source) as container:
            reader = _Reader(container, _stream(container, max_pixels), fmt, max_pixels, max_decoded, stop)
            if threads:
                reader.stream.thread_type = "AUTO"
            pts, keyframes = _index(container, reader.stream)
            if not pts:
                raise BadInput("the video has no frames")
            wanted = [int(i) for i in pick(len(pts))]
            got = _decode(av, source, reader, (pts, keyframes), sorted(set(wanted)))
    except (InputError, Stopped):
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise BadInput(f"the video could not be decoded ({exc})") from exc
    if not got:
        raise BadInput("no frame of the video could be decoded")
    last = got[max(got)]
    arr = np.stack([got.get(i, last) for i in wanted])  # a tail that does not decode repeats the last frame
    return arr[..., None] if arr.ndim == 3 else arr


def _open(av: Any, source: bytes | Path) -> Any:
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")


def _stream(container: Any, max_pixels: int) -> Any:
    """The first video stream, its header held to the pixel limit, and its decoder to the same limit."""
    if not container.streams.video:
        raise BadInput("the video has no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > max_pixels:
        raise TooLarge(f"video frames are {w}x{h}, more than {max_pixels} pixels")
    # libav checks it before it allocates a picture (an int there)
    stream.codec_context.options = {"max_pixels": str(min(max_pixels, 2**31 - 1))}
    return stream


def _index(container: Any, stream: Any) -> tuple[list[Any], list[int]]:
    """(every frame's timestamp in presentation order, None where a packet has none; the keyframes'
    timestamps), from the packets alone."""
    pts: list[Any] = []
    keyframes: list[int] = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's flush packet
        pts.append(packet.pts)
        if packet.is_keyframe and packet.pts is not None:
            keyframes.append(packet.pts)
    if all(t is not None for t in pts):
        pts.sort()
    return pts, sorted(keyframes)


def _decode(
    av: Any, source: bytes | Path, reader: _Reader, index: tuple[list[Any], list[int]], targets: list[int]
) -> dict[int, np.ndarray]:
    """The target frames, back from the start of the stream: seeking past what they do not need where
    every frame has a timestamp, else in one pass that keeps only the targets. A stream that cannot
    seek (a raw one) is opened again to read it from the start."""
    pts, keyframes = index
    try:
        reader.container.seek(keyframes[0] if keyframes else 0, stream=reader.stream, backward=True, any_frame=False)
    except av.error.PermissionError:
        with _open(av, source) as container:
            again = _Reader(container, _stream(container, reader.max_pixels), reader.fmt, reader.max_pixels,
                            reader.max_decoded, reader.stop)  # fmt: skip
            return _in_order(again, targets)
    if keyframes and all(t is not None for t in pts):
        return _seek_frames(reader, pts, keyframes, targets)
    return _in_order(reader, targets)


def _seek_frames(reader: _Reader, pts: list[int], keyframes: list[int], targets: list[int]) -> dict[int, np.ndarray]:
    """Decode each target frame (index into ``pts``) from the stream's start or its last position,
    seeking to the keyframe before a target only where a keyframe lies between the two."""
    got: dict[int, np.ndarray] = {}
    frames, position = reader.frames(), pts[0] - 1  # decoding from the start, nothing decoded yet
    for target in targets:
        want = pts[target]
        keyframe = keyframes[max(bisect.bisect_right(keyframes, want) - 1, 0)]
        if frames is None or position >= want or bisect.bisect_right(pts, position) < bisect.bisect_left(pts, keyframe):
            reader.container.seek(keyframe, stream=reader.stream, backward=True, any_frame=False)
            frames = reader.frames()
        for frame in frames:
            if frame.pts is None:
                continue
            position = frame.pts
            if position >= want:
                got[target] = reader.resized(frame)
                break
        else:
            frames = None  # the stream ended: the targets after this one repeat the last frame
    return got


def _in_order(reader: _Reader, targets: list[int]) -> dict[int, np.ndarray]:
    """Decode from the start, keeping the target frames (by their place in presentation order)."""
    got: dict[int, np.ndarray] = {}
    wanted, last = set(targets), max(targets)
    for i, frame in enumerate(reader.frames()):
        if i in wanted:
            got[i] = reader.resized(frame)
        if i >= last:
            break
    return got


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


class SampledVideo:
    """An encoded video read once from start to end, as the frames shown every ``1 / fps`` seconds.

    For long videos (timelines): iterating decodes every frame in order, one at a time, and yields
    the frame on screen at each time ``k / fps`` (k = 0, 1, ... while before the video's end; the
    first frame's timestamp is time 0), uint8 (H, W, C) at ``fmt``'s size. Only the frames yielded
    are converted, a frame shown at several sample times is converted once, and nothing but the
    frame on screen is held, so memory does not grow with the video. Every decoded frame is held to
    ``max_pixels`` and ``stop`` is asked between frames, as ``decode_video`` does; past ``max_frames``
    sampled frames it raises ``TooLarge``, from the header's duration before decoding when the
    container has one, else once decoding gets there. ``duration_s`` is the end of the last frame
    (its time plus its duration) once iterated.
    """

    EPS = 1e-6  # seconds: a sample time this close to a frame's start belongs to that frame

    def __init__(
        self,
        source: bytes | Path,
        fmt: FrameFormat,
        fps: float,
        *,
        max_pixels: int = 1 << 31,
        max_frames: int = MAX_DECODED,
        stop: Stop | None = None,
        threads: bool = False,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.source, self.fmt, self.fps = source, fmt, fps
        self.max_pixels, self.max_frames, self.stop, self.threads = max_pixels, max_frames, stop, threads
        self.sampled = 0  # frames yielded so far
        self.duration_s: float | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        av = _av()
        try:
            with _open(av, self.source) as container:
                # decoded frames are not bounded by MAX_DECODED: sampled frames, the pixel limit, the
                # body's size and the caller's stop bound a timeline
                reader = _Reader(container, _stream(container, self.max_pixels), self.fmt, self.max_pixels,
                                 sys.maxsize, self.stop)  # fmt: skip
                if self.threads:
                    reader.stream.thread_type = "AUTO"
                self._check(_header_duration(container, reader.stream))
                yield from self._sample(reader)
        except (InputError, Stopped):
            raise
        except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
            raise BadInput(f"the video could not be decoded ({exc})") from exc

    def _sample(self, reader: _Reader) -> Iterator[np.ndarray]:
        stream = reader.stream
        base = float(stream.time_base) if stream.time_base else None
        rate = stream.guessed_rate or stream.average_rate
        last: float | None = None  # the time of the frame on screen, from the first frame's
        shown: Any = None
        origin = interval = 0.0
        for frame in reader.frames():
            if frame.pts is not None and base is not None:
                time = float(frame.pts) * base - origin
                if shown is None:
                    origin, time = time, 0.0
            else:  # a raw stream: frames carry no timestamps, only durations
                time = 0.0 if last is None else last + interval
            if shown is not None:
                yield from self._until(time, shown, reader)
            interval = _frame_duration(frame, base) or (time - last if last is not None and time > last else 0.0)
            interval = interval or (1 / float(rate) if rate else 1 / self.fps)
            shown, last = frame, time
        if shown is None or last is None:
            raise BadInput("no frame of the video could be decoded")
        self.duration_s = last + interval
        yield from self._until(self.duration_s, shown, reader)

    def _until(self, time: float, frame: Any, reader: _Reader) -> Iterator[np.ndarray]:
        """``frame`` for every sample time before ``time`` (where the next frame starts)."""
        pixels = None
        while self.sampled / self.fps < time - self.EPS:
            self.sampled += 1
            self._check_count(self.sampled)
            if pixels is None:
                pixels = reader.resized(frame)
                pixels = pixels[..., None] if pixels.ndim == 2 else pixels
            yield pixels

    def _check(self, duration: float | None) -> None:
        if duration is not None:
            self._check_count(math.ceil(duration * self.fps - self.EPS), duration)

    def _check_count(self, count: int, duration: float | None = None) -> None:
        if count > self.max_frames:
            length = f"{duration:g} s of video" if duration is not None else "the video"
            raise TooLarge(
                f"{length} at {self.fps:g} frames per second is more than the limit of {self.max_frames} frames"
            )


def _header_duration(container: Any, stream: Any) -> float | None:
    """Seconds of video by the header: the stream's duration, else the container's; None when neither says."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # microseconds
    return None


def _frame_duration(frame: Any, base: float | None) -> float:
    """A decoded frame's duration in seconds, 0 when unknown."""
    duration = getattr(frame, "duration", None)
    return float(duration) * base if duration and base else 0.0
