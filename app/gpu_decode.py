"""JPEG frames decoded on the model's CUDA device: nvJPEG through torchvision, in one batch per upload.

When a model runs on CUDA, an upload's JPEG frames are decoded together by
``torchvision.io.decode_jpeg(..., device="cuda")`` (the GPU's hardware JPEG engines where it has
them), resized on the device (bilinear, antialiased) to the model's size, and returned as the
clip itself: uint8 (T, C, H, W) on the device, channels-last strides, as
``app.preprocess.array_to_clip`` gives on the host. The pixels differ from the CPU path's
(``media``: libjpeg-turbo at a reduced DCT scale, then Pillow's bilinear resize) by a few levels;
``tests/app/test_gpu_decode.py`` holds the tolerance and how it was measured.

What the GPU path does not take goes to the CPU decoders, unchanged: frames that are not JPEG
(PNG, WebP, BMP), a JPEG whose EXIF orientation says it is stored turned (``media`` turns it
upright with Pillow), CMYK and other colour spaces than YCbCr and grey, a file that does not end
where a JPEG ends (truncated: the CPU path reports it as undecodable), a frame over the pixel
limit (the CPU path refuses it with its 413 message), and any upload whose decode raises here.
The checks read only a JPEG's header, with ``media``'s own functions. Videos are decoded on the
GPU only where ``torchcodec`` imports (``GpuVideo``); elsewhere with PyAV on the CPU.

torchvision and torchcodec are imported when first used: the service runs without either.
"""

from __future__ import annotations

import importlib
import io
import threading
from collections import defaultdict
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image

from app.uploads import Target
from media import sample_indices
from media.images import EXIF_SEARCH, turned

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
GPU_COLOURS = ("YCbCr", "Gray")  # what nvJPEG converts as libjpeg-turbo does; RGB-coded and CMYK go to the CPU


class GpuDecodeError(RuntimeError):
    """The device could not decode an upload that looked eligible; the caller decodes it on the CPU."""


def _torchvision_io() -> Any:
    """``torchvision.io``, imported when first needed: the service runs without torchvision."""
    return importlib.import_module("torchvision.io")


def jpeg_header(blob: bytes) -> tuple[int, int, str] | None:
    """(width, height, colour space) of a JPEG, from its header, as ``media.images.decode_jpeg`` reads
    it; None when ``blob`` is not a JPEG whose header parses, or its EXIF says it is stored turned."""
    if not blob.startswith(JPEG_START):
        return None
    if blob.find(b"Exif\x00\x00", 0, EXIF_SEARCH) >= 0:
        try:
            if turned(Image.open(io.BytesIO(blob))):
                return None
        except Exception:  # a broken head or EXIF: the CPU path says what is wrong
            return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(blob)
    except ValueError:
        return None
    return width, height, colorspace


def resize_frames(frames: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Decoded frames (C, h, w) uint8, of any sizes, on one device -> (T, C, H, W) uint8 at (height,
    width), channels-last strides. Frames of one size are resized together: bilinear with antialias
    (a reduction averages every source pixel it covers, as Pillow's does), rounded to uint8."""
    T, C = len(frames), frames[0].shape[0]
    out = torch.empty((T, height, width, C), dtype=torch.uint8, device=frames[0].device).permute(0, 3, 1, 2)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, frame in enumerate(frames):
        by_size[(frame.shape[1], frame.shape[2])].append(i)
    for size, index in by_size.items():
        batch = torch.stack([frames[i] for i in index])  # (n, C, h, w)
        if size != (height, width):
            batch = torch.nn.functional.interpolate(
                batch.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )
            batch = batch.round_().clamp_(0, 255).to(torch.uint8)
        if len(index) == T:
            out.copy_(batch)
        else:
            out[torch.tensor(index, device=out.device)] = batch
    return out


class GpuJpeg:
    """nvJPEG decoding of whole uploads on ``device``. ``decode`` runs on the decode threads, each on a
    CUDA stream of its own, and returns once its clip is complete, so the clip can be used on any
    stream (the runtime records its use on its own, ``app.cuda.CudaPath.stage``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local = threading.local()

    @staticmethod
    def unavailable(device: torch.device) -> str | None:
        """Why JPEG frames cannot be decoded on ``device`` (None: they can): not a CUDA device, no CUDA,
        torchvision missing, or its ``decode_jpeg`` not built to decode on the device."""
        if device.type != "cuda":
            return f"the model runs on {device.type}, not CUDA"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            tv_io = _torchvision_io()
        except Exception as exc:  # absent, or its operators do not load beside this torch
            return f"torchvision does not import ({type(exc).__name__}: {exc})"
        probe = simplejpeg.encode_jpeg(np.zeros((8, 8, 3), dtype=np.uint8), colorspace="RGB")
        try:
            tv_io.decode_jpeg([_as_tensor(probe)], device=device, mode=tv_io.ImageReadMode.RGB)
            torch.cuda.synchronize(device)
        except Exception as exc:
            return f"torchvision cannot decode JPEG on {device} ({type(exc).__name__}: {exc})"
        return None

    @staticmethod
    def eligible(blob: bytes, target: Target) -> bool:
        """Whether ``blob`` is a JPEG the device decodes to the CPU path's picture: upright (EXIF), YCbCr
        or grey, complete (it ends with the end-of-image marker) and within the pixel limit."""
        header = jpeg_header(blob)
        if header is None:
            return False
        width, height, colorspace = header
        return (
            colorspace in GPU_COLOURS
            and width * height <= target.limits.max_pixels
            and blob.rstrip(b"\x00").endswith(JPEG_END)
        )

    def decode(self, blobs: list[bytes], target: Target) -> torch.Tensor:
        """Eligible JPEG frames, in order -> their clip (T, C, H, W) uint8 on the device at ``target``'s
        size, channels-last. Raises ``GpuDecodeError`` when the device cannot decode them."""
        target.check_count(len(blobs))
        tv_io = _torchvision_io()
        fmt = target.format
        mode = tv_io.ImageReadMode.RGB if fmt.channels == 3 else tv_io.ImageReadMode.GRAY
        stream = self._stream()
        try:
            with torch.cuda.stream(stream):
                frames = tv_io.decode_jpeg([_as_tensor(b) for b in blobs], device=self.device, mode=mode)
                clip = resize_frames(frames, fmt.height, fmt.width)
            stream.synchronize()  # the clip is complete before another stream reads it
        except Exception as exc:
            raise GpuDecodeError(f"{type(exc).__name__}: {exc}") from exc
        if clip.shape[1] != fmt.channels:
            raise GpuDecodeError(f"decoded {clip.shape[1]} channels, the model takes {fmt.channels}")
        return clip

    def _stream(self) -> torch.cuda.Stream:
        """This decode thread's CUDA stream: decodes on different threads do not wait for each other."""
        stream: torch.cuda.Stream | None = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(self.device)
        return stream


def _as_tensor(blob: bytes) -> torch.Tensor:
    """Encoded bytes as a uint8 tensor (a copy: torch wants a writable buffer)."""
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


class GpuVideo:
    """Videos decoded by the GPU's video engines (NVDEC) through torchcodec, sampled as ``media`` samples
    them, resized on the device. Unrun where torchcodec is not installed (it is not a dependency): the
    server uses it only when ``unavailable`` says it can, and decodes videos with PyAV otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def unavailable(device: torch.device) -> str | None:
        if device.type != "cuda" or not torch.cuda.is_available():
            return "no CUDA device"
        try:
            importlib.import_module("torchcodec.decoders")
        except Exception as exc:
            return f"torchcodec does not import ({type(exc).__name__})"
        return None

    def decode(self, data: bytes, target: Target, frames: int | None = None) -> torch.Tensor:
        """An encoded video -> (T, C, H, W) uint8 on the device, ``frames`` (default: the model's clip
        length) sampled evenly. Raises ``GpuDecodeError`` for anything the CPU path should see instead."""
        wanted = frames or target.clip_frames
        target.check_count(wanted)
        try:
            codec: Any = importlib.import_module("torchcodec.decoders")
            decoder = codec.VideoDecoder(data, device=str(self.device))
            meta = decoder.metadata
            length = int(meta.num_frames or 0)
            if length <= 0 or meta.width * meta.height > target.limits.max_pixels:
                raise GpuDecodeError("no frame count in the header, or a frame over the pixel limit")
            picks = sample_indices(length, wanted).tolist()
            batch = decoder.get_frames_at(indices=picks).data  # (T, C, h, w) uint8 on the device
            if target.format.channels == 1:
                weights = torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)
                batch = (batch.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
            clip = resize_frames(list(batch), target.format.height, target.format.width)
            torch.cuda.synchronize(self.device)
        except GpuDecodeError:
            raise
        except Exception as exc:
            raise GpuDecodeError(f"{type(exc).__name__}: {exc}") from exc
        return clip
