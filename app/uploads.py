"""An upload as read off the wire -> one clip's pixels, uint8 (T, H, W, C) at a model's size.

Two stages, both off the event loop: ``parse_upload`` splits a multipart form or parses a JSON
document into what it holds (encoded images, or one encoded video), and ``decode_parsed`` decodes
that with ``media``, as training decodes it. They run on a decode thread or in a decode process
(``app.decoding``), so this module imports no torch and raises only the ``media`` errors, which
pickle. ``stop`` is asked between frames: a decode whose request has ended stops.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np

from app.multipart import parse_form as parse_form_parts
from media import BadInput, FrameFormat, Limits, Stopped, WrongShape, decode_image, decode_video, sample_indices

Stop = Callable[[], bool]


@dataclass(frozen=True)
class Target:
    """What one model's uploads decode to: its frame format, the clip length a video is sampled
    to by default, and the server's limits on what it decodes."""

    format: FrameFormat
    clip_frames: int
    limits: Limits

    def check_count(self, count: int, what: str = "frames") -> None:
        if count == 0:
            raise WrongShape(f"no {what}: send at least one frame")
        if count > self.limits.max_frames:
            raise WrongShape(f"{count} {what} is more than the limit of {self.limits.max_frames}")


@dataclass(frozen=True)
class Upload:
    """One request's body, read: a multipart ``form`` (``frames`` parts or one ``video`` part) or a
    ``json`` document (``{"frames": [base64, ...]}`` or ``{"video": base64}``); ``frames`` samples a
    video to that count."""

    kind: Literal["form", "json"]
    data: bytes
    content_type: str = ""
    frames: int | None = None


@dataclass(frozen=True)
class Parsed:
    """What an upload holds: encoded images in order, or one encoded video (and how many frames to
    sample from it; None: the model's clip length)."""

    images: list[bytes] | None = None
    video: bytes | None = None
    frames: int | None = None


class FrameSplitter:
    """Decode threads that may take the second half of a large clip (``DECODE_SPLIT_KB``).

    A clip whose encoded frames total ``split_bytes`` or more offers its second half to
    ``helpers`` while its own thread decodes the first, and takes the half back if no thread
    has started it by then: a thread never waits for work that is only queued, so there is no
    deadlock when every thread does this. Both JPEG decoders release the interpreter lock.
    """

    def __init__(self, helpers: Executor, split_bytes: int) -> None:
        self.helpers, self.split_bytes = helpers, split_bytes

    def decode(self, blobs: list[bytes], target: Target, stop: Stop | None = None) -> list[np.ndarray]:
        half = len(blobs) // 2
        if half == 0 or sum(map(len, blobs)) < self.split_bytes:
            return decode_each(blobs, target, 0, stop)
        try:
            offered = self.helpers.submit(decode_each, blobs[half:], target, half, stop)
        except RuntimeError:  # the threads are shut down: the server is stopping
            return decode_each(blobs, target, 0, stop)
        try:
            frames = decode_each(blobs[:half], target, 0, stop)
        except BaseException:
            offered.cancel()  # the first bad frame is the one reported
            raise
        rest = decode_each(blobs[half:], target, half, stop) if offered.cancel() else offered.result()
        return frames + rest


def decode_each(blobs: list[bytes], target: Target, first: int = 0, stop: Stop | None = None) -> list[np.ndarray]:
    fmt, max_pixels = target.format, target.limits.max_pixels
    frames = []
    for i, blob in enumerate(blobs):
        if stop is not None and stop():
            raise Stopped("the decode is no longer wanted")
        frames.append(decode_image(blob, fmt, max_pixels, first + i))
    return frames


def image_frames(
    blobs: list[bytes], target: Target, splitter: FrameSplitter | None = None, stop: Stop | None = None
) -> np.ndarray:
    """Encoded images, in order -> (T, H, W, C) uint8."""
    target.check_count(len(blobs))
    return np.stack(splitter.decode(blobs, target, stop) if splitter else decode_each(blobs, target, 0, stop))


def video_frames(data: bytes, target: Target, frames: int | None = None, stop: Stop | None = None) -> np.ndarray:
    """An encoded video -> (T, H, W, C) uint8, ``frames`` (default: the model's clip length) sampled evenly."""
    wanted = frames or target.clip_frames
    target.check_count(wanted)
    pick = partial(sample_indices, frames=wanted)
    limits = target.limits
    return decode_video(
        data,
        target.format,
        pick,
        max_pixels=limits.max_pixels,
        max_decoded=limits.max_decoded,
        stop=stop,
        threads=True,  # the codec's own threads, as a lone upload's decode is otherwise one core's
    )


def base64_images(items: list[object]) -> list[bytes]:
    blobs = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadInput(f"frame {i} must be a base64 string")
        if item.startswith("data:") and "," in item:  # a data URL
            item = item.split(",", 1)[1]
        try:
            blobs.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise BadInput(f"frame {i} is not valid base64 ({exc})") from exc
    return blobs


def parse_form(body: bytes, content_type: str, target: Target, frames: int | None) -> Parsed:
    """A multipart body: its ``frames`` file parts in order, or one ``video`` part."""
    parts = parse_form_parts(body, content_type, max_files=target.limits.max_frames)
    unknown = sorted({p.name for p in parts} - {"frames", "video"})
    if unknown:
        raise BadInput(f"unknown parts {unknown}; send 'frames' parts or one 'video' part")
    images = [p for p in parts if p.name == "frames"]
    videos = [p for p in parts if p.name == "video"]
    if images and videos:
        raise BadInput("send either 'frames' parts or one 'video' part, not both")
    if len(videos) > 1:
        raise WrongShape("send one 'video' part per request")
    if videos:
        if videos[0].filename is None:
            raise BadInput("the 'video' part must be a file")
        return Parsed(video=videos[0].data, frames=frames)
    for i, part in enumerate(images):
        if part.filename is None:
            raise BadInput(f"frame {i} must be a file part")
    return Parsed(images=[p.data for p in images])


def parse_json(body: bytes, target: Target, frames: int | None) -> Parsed:
    """A JSON body: ``{"frames": [base64 image, ...]}`` or ``{"video": base64}``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInput(f"the body is not valid JSON ({type(exc).__name__})") from exc
    # a key set to null is absent: clients often write their optional fields that way
    video, images = (doc.get("video"), doc.get("frames")) if isinstance(doc, dict) else (None, None)
    if video is None and images is None:
        raise BadInput('the JSON body must be {"frames": ["<base64 image>", ...]} or {"video": "<base64>"}')
    if video is not None and images is not None:
        raise BadInput('send "frames" or "video", not both')
    if images is not None:
        if not isinstance(images, list):
            raise BadInput('"frames" must be a list of base64 strings')
        target.check_count(len(images))
        return Parsed(images=base64_images(images))
    if not isinstance(video, str):
        raise BadInput(f'"video" must be a base64 string, not {type(video).__name__}')
    try:
        return Parsed(video=base64.b64decode(video, validate=True), frames=frames)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"video is not valid base64 ({exc})") from exc


def parse_upload(upload: Upload, target: Target) -> Parsed:
    if upload.kind == "form":
        return parse_form(upload.data, upload.content_type, target, upload.frames)
    return parse_json(upload.data, target, upload.frames)


def decode_parsed(
    parsed: Parsed, target: Target, splitter: FrameSplitter | None = None, stop: Stop | None = None
) -> np.ndarray:
    if parsed.video is not None:
        return video_frames(parsed.video, target, parsed.frames, stop)
    return image_frames(parsed.images or [], target, splitter, stop)


def decode_upload(
    upload: Upload, target: Target, splitter: FrameSplitter | None = None, stop: Stop | None = None
) -> np.ndarray:
    """One upload -> its clip, uint8 (T, H, W, C) at ``target``'s size."""
    return decode_parsed(parse_upload(upload, target), target, splitter, stop)
