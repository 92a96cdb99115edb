"""Decoding and resizing: an upload (multipart form, base64 frames, a video) -> one clip's
pixels, a uint8 array (T, H, W, C) at the model's size.

These functions are synchronous and CPU-bound; the server runs them on its decode threads
or in its decode processes (``DECODE_PROCESSES``, ``app.decoders``), so this module
imports no torch: a decode process stays small (``app.preprocess`` makes tensors of the
arrays). Every failure is an ``ApiError`` with a 4xx status that says which frame and why.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import os
import signal
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from app.errors import ApiError, bad_input, too_large, wrong_shape
from app.multipart import parse_form

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "BMP"}


@dataclass(frozen=True)
class InputLimits:
    height: int
    width: int
    channels: int
    frames: int  # the model's training clip length: default for sampling videos
    max_frames: int
    max_pixels: int


def check_count(count: int, limits: InputLimits, what: str = "frames") -> None:
    if count == 0:
        raise wrong_shape(f"no {what}: send at least one frame")
    if count > limits.max_frames:
        raise wrong_shape(f"{count} {what} is more than the limit of {limits.max_frames}")


def draft_scale(width: int, height: int, limits: InputLimits) -> int:
    """The JPEG scale (1, 2, 4 or 8) to decode at: the largest that keeps both sides at or
    above the model's, as Pillow's draft mode picks it (and the training data's decoding)."""
    most = min(width // limits.width, height // limits.height)
    return next((s for s in (8, 4, 2) if most >= s), 1)


def decode_jpeg(data: bytes, limits: InputLimits, index: int) -> np.ndarray | None:
    """A JPEG in YCbCr, RGB or grey through libjpeg-turbo's own interface (simplejpeg) -> uint8
    (H, W, C) at the decoded scale, the same pixels as Pillow's decoder at 4x its speed on
    64x64 frames (26-30 against 120 us; docs/PERFORMANCE.md), without the interpreter lock.

    None for whatever it does not take (not a JPEG, CMYK, or any error, a warning included):
    Pillow decodes those, or says what is wrong with them.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB", "Gray"):
        return None
    if width * height > limits.max_pixels:
        raise too_large(f"frame {index} is {width}x{height}, more than {limits.max_pixels} pixels")
    scale = draft_scale(width, height, limits)
    try:
        return simplejpeg.decode_jpeg(
            data,
            "RGB" if limits.channels == 3 else "GRAY",
            min_height=-(-height // scale),
            min_width=-(-width // scale),
            min_factor=scale,  # with the two sizes above: exactly 1/scale
        )
    except ValueError:
        return None


def pillow_image(data: bytes, limits: InputLimits, index: int) -> Image.Image:
    """One encoded image of any supported format, decoded by Pillow in the model's mode (RGB or L)."""
    try:  # the explicit pixel check guards against decompression bombs before any pixel is decoded
        opened = Image.open(io.BytesIO(data))
        if opened.format not in IMAGE_FORMATS:
            raise bad_input(f"frame {index} is {opened.format}; send JPEG, PNG, WebP or BMP")
        w, h = opened.size
        if w * h > limits.max_pixels:
            raise too_large(f"frame {index} is {w}x{h}, more than {limits.max_pixels} pixels")
        mode = "RGB" if limits.channels == 3 else "L"
        opened.draft(mode, (limits.width, limits.height))  # JPEG: decode at a reduced scale
        opened.load()
        # convert() copies even when the mode already matches (JPEG decodes straight to RGB or L)
        return opened if opened.mode == mode else opened.convert(mode)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice its pixel limit
        raise too_large(f"frame {index} is a decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise bad_input(f"frame {index} is not a decodable image ({exc})") from exc


def decode_image(data: bytes, limits: InputLimits, index: int) -> np.ndarray:
    """One encoded image -> uint8 (H, W, C) at the model's size."""
    if not data:
        raise bad_input(f"frame {index} is empty")
    arr = decode_jpeg(data, limits, index)
    if arr is None:
        img = pillow_image(data, limits, index)
    elif arr.shape[:2] == (limits.height, limits.width):
        return arr
    else:
        img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if img.size != (limits.width, limits.height):
        img = img.resize((limits.width, limits.height), Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


# Other decode threads that may take the second half of a large clip (``share_frames_with``)
_helpers: Executor | None = None
_split_bytes = 0


def share_frames_with(helpers: Executor | None, split_bytes: int = 0) -> None:
    """From now on a clip whose encoded frames total ``split_bytes`` or more offers its second half
    to ``helpers`` (the server's decode threads) while its own thread decodes the first; None or
    0: every clip on one thread. Decode processes never share (this is per process)."""
    global _helpers, _split_bytes
    _helpers, _split_bytes = (helpers, split_bytes) if split_bytes > 0 else (None, 0)


def stop_sharing(helpers: Executor) -> None:
    """As ``share_frames_with(None)``, if ``helpers`` are the ones shared (another server in the same
    process may have shared its own since)."""
    if _helpers is helpers:
        share_frames_with(None)


def _decode_each(blobs: list[bytes], limits: InputLimits, first: int) -> list[np.ndarray]:
    return [decode_image(b, limits, first + i) for i, b in enumerate(blobs)]


def image_frames(blobs: list[bytes], limits: InputLimits) -> np.ndarray:
    """Encoded images, in order -> (T, H, W, C) uint8.

    A large clip (``share_frames_with``) is decoded in two halves at once: the second is offered to
    the other decode threads, and taken back if none has started it by the time the first is done,
    so a thread never waits for work that is only queued (no deadlock when every thread does this).
    Both decoders release the interpreter lock: 16 frames of 224x224 took 3.3 instead of 5.3 ms.
    """
    check_count(len(blobs), limits)
    helpers, half = _helpers, len(blobs) // 2
    if helpers is None or half == 0 or sum(map(len, blobs)) < _split_bytes:
        return np.stack(_decode_each(blobs, limits, 0))
    try:
        offered = helpers.submit(_decode_each, blobs[half:], limits, half)
    except RuntimeError:  # the threads are shut down: the server is stopping
        return np.stack(_decode_each(blobs, limits, 0))
    try:
        frames = _decode_each(blobs[:half], limits, 0)
    except BaseException:
        offered.cancel()  # the first bad frame is the one reported
        raise
    rest = _decode_each(blobs[half:], limits, half) if offered.cancel() else offered.result()
    return np.stack(frames + rest)


def base64_frames(items: list[object], limits: InputLimits) -> np.ndarray:
    check_count(len(items), limits)
    blobs = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise bad_input(f"frame {i} must be a base64 string")
        if item.startswith("data:") and "," in item:  # data URL
            item = item.split(",", 1)[1]
        try:
            blobs.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise bad_input(f"frame {i} is not valid base64 ({exc})") from exc
    return image_frames(blobs, limits)


def sample_positions(total: int, wanted: int) -> list[int]:
    """``wanted`` frame positions spread evenly over ``total`` frames (segment centres)."""
    if total <= wanted:
        return list(range(total))
    edges = np.linspace(0, total, wanted + 1)
    return [min(total - 1, int((a + b) / 2)) for a, b in itertools.pairwise(edges)]


def video_frames(data: bytes, limits: InputLimits, frames: int | None = None) -> np.ndarray:
    """An encoded video -> (T, H, W, C) uint8, T = ``frames`` (default: the model's) sampled evenly."""
    try:
        import av
    except ImportError as exc:  # the `video` extra is not installed
        raise ApiError(
            415, "unsupported_media_type", "video input needs PyAV (pip install fusionserve[video])"
        ) from exc
    wanted = frames or limits.frames
    check_count(wanted, limits)
    fmt = "rgb24" if limits.channels == 3 else "gray"
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise bad_input("the video part has no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > limits.max_pixels:
                raise too_large(f"video frames are {w}x{h}, more than {limits.max_pixels} pixels")
            stream.thread_type = "AUTO"
            decoded = []
            for frame in container.decode(stream):
                decoded.append(frame.reformat(width=limits.width, height=limits.height, format=fmt).to_ndarray())
                if len(decoded) > 10_000:
                    raise too_large("the video has more than 10000 frames")
    except ApiError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise bad_input(f"the video could not be decoded ({exc})") from exc
    if not decoded:
        raise bad_input("the video has no decodable frames")
    picked = [decoded[i] for i in sample_positions(len(decoded), wanted)]
    return np.stack([f[..., None] if f.ndim == 2 else f for f in picked])


def form_frames(body: bytes, content_type: str, limits: InputLimits, frames: int | None) -> np.ndarray:
    """A multipart body -> one clip: its 'frames' file parts in order, or one 'video' part."""
    parts = parse_form(body, content_type, max_files=limits.max_frames)
    images = [p for p in parts if p.name == "frames"]
    videos = [p for p in parts if p.name == "video"]
    if images and videos:
        raise bad_input("send either 'frames' parts or one 'video' part, not both")
    if len(videos) > 1:
        raise wrong_shape("send one 'video' part per request")
    if videos:
        if videos[0].filename is None:
            raise bad_input("the 'video' part must be a file")
        return video_frames(videos[0].data, limits, frames)
    for i, part in enumerate(images):
        if part.filename is None:
            raise bad_input(f"frame {i} must be a file part")
    return image_frames([p.data for p in images], limits)


def process_id(delay_s: float = 0.0) -> int:
    """In a decode process: its pid, after ``delay_s`` (the pool starts every process with it)."""
    time.sleep(delay_s)
    return os.getpid()


def ignore_interrupts() -> None:
    """In a decode process, first: SIGINT is the server's to act on. A terminal's Ctrl-C reaches the
    whole process group; the server shuts its decode processes down once it has answered what it
    accepted. (SIGTERM stays: the pool stops the processes of a broken pool with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
