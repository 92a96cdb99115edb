"""JPEG frames decoded on the GPU (app.gpu_decode): pixels against the CPU path, what falls back, and
the decoders without a GPU decoder.

Tolerance. The CPU path decodes a JPEG at a reduced DCT scale (libjpeg-turbo, the largest of 1/2,
1/4, 1/8 that keeps both sides at or above the model's) and resizes it with Pillow's bilinear
filter; the GPU path decodes at full size and resizes with ``interpolate(bilinear, antialias)``.
Measured with torchvision's CPU ``decode_jpeg`` standing in for nvJPEG (the same resize code;
moving-digits frames and noisy gradients, quality 90, RGB and grey, sources of 16-640 pixels to
models of 32, 64 and 224, and this file's own frames): equal sizes give
identical pixels; a source exactly 2x the model's (the CPU decodes at 1/2 scale and never resizes)
differs most, largest 45 levels, mean 4.8, 99th percentile 24, on the digits' sharp edges; every
other ratio largest 26, mean at most 1.6, 99th percentile at most 8. nvJPEG's own IDCT and chroma
upsampling add to that on a real GPU, so the bounds keep a margin: mean at most ``MEAN_TOL``, 99th
percentile at most ``P99_TOL``, largest at most ``MAX_TOL``. The gpu tests print what they measure.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.decoding import Decoders, Handoff
from app.gpu_decode import GpuJpeg, resize_frames
from app.preprocess import array_to_clip
from app.runtime import ModelRuntime
from app.uploads import Target, Upload, image_frames
from media import BadInput, FrameFormat, Limits
from models import load_checkpoint
from tests.support.media import claim_size, encode, multipart_frames, picture, synth_clip

MEAN_TOL, P99_TOL, MAX_TOL = 8.0, 40, 96
RGB = Target(FrameFormat(32, 32, 3), 16, Limits(64, 4096 * 4096))
GREY = Target(FrameFormat(32, 32, 1), 16, Limits(64, 4096 * 4096))
SIZES = [16, 32, 48, 64, 100, 256]  # smaller than, equal to, 1.5x, 2x (the CPU's 1/2 scale), 3x, 8x the model's


def jpeg_frames(size: int, grey: bool, count: int = 4) -> list[bytes]:
    """Moving-digits frames and a noisy gradient at ``size`` x ``size``, as Pillow writes JPEGs."""
    frames = [*list(synth_clip("left", frames=count - 1, seed=size, size=size)), picture(size, size, seed=size)]
    return [encode(np.asarray(Image.fromarray(f).convert("L")) if grey else f, "JPEG", quality=90) for f in frames]


def turned_jpeg(frame: np.ndarray) -> bytes:
    """A JPEG whose EXIF says it is stored turned (orientation 6), as a phone writes a portrait photo."""
    image = Image.fromarray(frame)
    exif = image.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def cmyk_jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


def form(blobs: list[bytes], fmt: str = "jpeg") -> Upload:
    """A multipart upload of ``blobs`` as ``frames`` parts."""
    boundary = "gpudecodeboundary"
    parts = []
    for name, (filename, data, content_type) in multipart_frames(blobs, fmt):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return Upload("form", body, f"multipart/form-data; boundary={boundary}")


def decode_with(decoders: Decoders, upload: Upload, target: Target) -> tuple[Any, BaseException | None]:
    """What ``decoders`` hands to ``done`` for ``upload``."""
    got: list[tuple[Any, BaseException | None]] = []
    finished = threading.Event()

    def done(clip: Any, exc: BaseException | None) -> None:
        got.append((clip, exc))
        finished.set()

    decoders.decode(upload, target, done, lambda: False)
    assert finished.wait(30), "the decode never answered"
    return got[0]


def differences(gpu: torch.Tensor, cpu: torch.Tensor) -> tuple[int, float, float]:
    """(largest, mean, 99th percentile) absolute difference of two uint8 clips."""
    diff = (gpu.cpu().int() - cpu.int()).abs().flatten().float()
    return int(diff.max()), float(diff.mean()), float(torch.quantile(diff, 0.99))


# without a GPU


def test_the_gpu_decoder_is_unavailable_on_the_cpu() -> None:
    reason = GpuJpeg.unavailable(torch.device("cpu"))
    assert reason is not None and "cpu" in reason


def test_a_plain_jpeg_is_eligible_in_rgb_and_grey() -> None:
    for grey in (False, True):
        for blob in jpeg_frames(48, grey, count=2):
            assert GpuJpeg.eligible(blob, RGB) and GpuJpeg.eligible(blob, GREY)


def test_what_the_gpu_does_not_take_is_not_eligible() -> None:
    frame = synth_clip("up", frames=1, size=48)[0]
    plain = encode(frame, "JPEG")
    cases = {
        "png": encode(frame, "PNG"),
        "webp": encode(frame, "WEBP"),
        "bmp": encode(frame, "BMP"),
        "exif-turned": turned_jpeg(frame),
        "truncated": plain[: len(plain) // 2],
        "corrupt head": b"\xff\xd8" + b"\x00" * 200,
        "cmyk": cmyk_jpeg(frame),
        "empty": b"",
    }
    for name, blob in cases.items():
        assert not GpuJpeg.eligible(blob, RGB), name
    small = Target(RGB.format, 16, Limits(64, max_pixels=48 * 48 - 1))
    assert GpuJpeg.eligible(plain, RGB) and not GpuJpeg.eligible(plain, small), "over max_pixels"
    assert not GpuJpeg.eligible(claim_size(plain, 5000, 5000), RGB), "a header claiming a bomb's size"


def test_resize_frames_keeps_equal_sizes_and_gives_channels_last_uint8() -> None:
    frames = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), torch.full((3, 64, 64), 200, dtype=torch.uint8)]
    clip = resize_frames(frames, 32, 32)
    assert clip.shape == (2, 3, 32, 32) and clip.dtype == torch.uint8
    assert clip.stride() == array_to_clip(np.zeros((2, 32, 32, 3), dtype=np.uint8)).stride()
    assert torch.equal(clip[0], frames[0]) and bool((clip[1] == 200).all())


def test_decoders_without_a_gpu_decoder_give_the_cpu_arrays() -> None:
    blobs = [*jpeg_frames(48, grey=False), encode(synth_clip("up", frames=1, size=48)[0], "PNG")]
    decoders = Decoders(2)
    try:
        clip, exc = decode_with(decoders, form(blobs), RGB)
        assert exc is None and isinstance(clip, np.ndarray)
        assert np.array_equal(clip, image_frames(blobs, RGB))
        corrupt = [*blobs[:1], blobs[1][:100]]
        clip, exc = decode_with(decoders, form(corrupt), RGB)
        assert clip is None and isinstance(exc, BadInput) and "frame 1" in str(exc)
    finally:
        decoders.shutdown()


class FailingDevice:
    """A device decoder that takes every frame and fails each decode: the CPU must answer instead."""

    def __init__(self) -> None:
        self.calls = 0

    def eligible(self, blob: bytes, target: Target) -> bool:
        return True

    def decode(self, blobs: list[bytes], target: Target) -> torch.Tensor:
        self.calls += 1
        raise RuntimeError("nvJPEG refused it")


def test_a_failing_device_decode_falls_back_to_the_cpu_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    device = FailingDevice()
    decoders = Decoders(1, device=device)
    blobs = jpeg_frames(48, grey=False)
    try:
        for _ in range(2):
            clip, exc = decode_with(decoders, form(blobs), RGB)
            assert exc is None and np.array_equal(clip, image_frames(blobs, RGB))
    finally:
        decoders.shutdown()
    assert device.calls == 2 and decoders.device_failed
    assert sum("on the device failed" in r.message for r in caplog.records) == 1


def test_a_withdrawal_reaches_a_job_handed_to_a_process_before_or_after_the_handoff() -> None:
    calls: list[str] = []
    early = Handoff()
    early()  # the request ended before the thread handed its job over
    early.handed(lambda: calls.append("early"))
    late = Handoff()
    late.handed(lambda: calls.append("late"))
    assert calls == ["early"]
    late()
    assert calls == ["early", "late"]


def test_with_decode_processes_what_the_device_refuses_decodes_in_a_process() -> None:
    blobs = [encode(f, "PNG") for f in synth_clip("right", frames=3, size=48)]
    device = FailingDevice()
    device.eligible = GpuJpeg.eligible  # type: ignore[method-assign]  # the real rules: PNG is not for it
    decoders = Decoders(1, processes=1, device=device)
    try:
        decoders.start()
        clip, exc = decode_with(decoders, form(blobs, "png"), RGB)
        assert exc is None and np.array_equal(clip, image_frames(blobs, RGB))
    finally:
        decoders.shutdown()
    assert device.calls == 0 and not decoders.device_failed  # PNG frames never reach the device


# on a GPU


@pytest.fixture(scope="module")
def gpu() -> GpuJpeg:
    device = torch.device("cuda")
    reason = GpuJpeg.unavailable(device)
    assert reason is None, reason
    return GpuJpeg(device)


@pytest.mark.gpu
@pytest.mark.parametrize("grey_source", [False, True], ids=["rgb-jpeg", "grey-jpeg"])
@pytest.mark.parametrize("target", [RGB, GREY], ids=["rgb-model", "grey-model"])
def test_gpu_pixels_are_within_the_tolerance_of_the_cpu_path(gpu: GpuJpeg, target: Target, grey_source: bool) -> None:
    for size in SIZES:
        blobs = jpeg_frames(size, grey_source)
        assert all(GpuJpeg.eligible(b, target) for b in blobs)
        got = gpu.decode(blobs, target)
        C = target.format.channels
        assert got.is_cuda and got.dtype == torch.uint8 and got.shape == (len(blobs), C, 32, 32)
        assert got.stride() == array_to_clip(np.zeros((len(blobs), 32, 32, C), dtype=np.uint8)).stride()
        largest, mean, p99 = differences(got, array_to_clip(image_frames(blobs, target)))
        source = "grey" if grey_source else "rgb"
        print(f"{size}px {source} -> {C} channels: max {largest}, mean {mean:.2f}, p99 {p99:.0f}")
        assert mean <= MEAN_TOL and p99 <= P99_TOL and largest <= MAX_TOL, (size, largest, mean, p99)


@pytest.mark.gpu
def test_an_upload_the_gpu_cannot_take_whole_decodes_on_the_cpu(gpu: GpuJpeg) -> None:
    frames = synth_clip("down", frames=3, size=48)
    jpegs = [encode(f, "JPEG") for f in frames]
    uploads = {
        "png among jpegs": [*jpegs[:2], encode(frames[2], "PNG")],
        "exif-turned jpeg": [*jpegs[:2], turned_jpeg(frames[2])],
    }
    decoders = Decoders(2, device=gpu)
    try:
        clip, exc = decode_with(decoders, form(jpegs), RGB)
        assert exc is None and isinstance(clip, torch.Tensor) and clip.is_cuda
        for name, blobs in uploads.items():
            clip, exc = decode_with(decoders, form(blobs), RGB)
            assert exc is None and isinstance(clip, np.ndarray), name
            assert np.array_equal(clip, image_frames(blobs, RGB)), name
        corrupt = [*jpegs[:2], jpegs[2][: len(jpegs[2]) // 2]]
        clip, exc = decode_with(decoders, form(corrupt), RGB)
        with pytest.raises(BadInput) as cpu_error:
            image_frames(corrupt, RGB)
        assert clip is None and isinstance(exc, BadInput) and str(exc) == str(cpu_error.value)
    finally:
        decoders.shutdown()
    assert not decoders.device_failed


@pytest.mark.gpu
def test_a_corrupt_jpeg_that_passes_the_checks_falls_back_to_the_cpu_error(gpu: GpuJpeg) -> None:
    """Garbage after a valid header, ending with the end marker: nvJPEG fails or decodes noise; either way
    the answer is the CPU's (a 400 there, or its pixels)."""
    good = encode(synth_clip("left", frames=1, size=48)[0], "JPEG")
    head = good.index(b"\xff\xda")  # start of scan: keep the header, garble the entropy-coded data
    garbled = good[: head + 12] + bytes(range(256)) * 2 + b"\xff\xd9"
    decoders = Decoders(1, device=gpu)
    try:
        clip, exc = decode_with(decoders, form([good, garbled]), RGB)
    finally:
        decoders.shutdown()
    try:
        expected: np.ndarray | None = image_frames([good, garbled], RGB)
    except BadInput as cpu_error:
        assert clip is None and isinstance(exc, BadInput) and str(exc) == str(cpu_error)
        return
    assert exc is None and expected is not None
    got = clip.cpu() if isinstance(clip, torch.Tensor) else array_to_clip(clip)
    assert got.shape == array_to_clip(expected).shape


@pytest.mark.gpu
def test_a_batch_of_device_clips_gives_the_host_clips_probabilities(default_ckpt: Any) -> None:
    device = torch.device("cuda")
    runtime = ModelRuntime(load_checkpoint(default_ckpt, device=device), device, precision="fp32", cuda_graphs=True)
    runtime.warm_up(64)
    runtime.prepare(4)
    host = [
        array_to_clip(synth_clip(label, frames=n, seed=i)) for i, (label, n) in enumerate([("left", 16), ("up", 9)])
    ]
    lengths = torch.tensor([c.shape[0] for c in host])
    expected = runtime.run(runtime.stage(host), lengths).result()
    on_device = [c.to(device) for c in host]
    for clips in (on_device, [on_device[0], host[1]]):  # all on the device, and mixed
        frames = runtime.stage(clips)
        assert frames.is_cuda and frames.shape == (25, 3, 32, 32)
        torch.testing.assert_close(runtime.run(frames, lengths).result(), expected, atol=1e-5, rtol=0)
    uniform = [on_device[0], on_device[0]]  # two clips of the model's length: a captured graph
    torch.testing.assert_close(
        runtime.run(runtime.stage(uniform), torch.tensor([16, 16])).result(),
        runtime.run(runtime.stage([host[0], host[0]]), torch.tensor([16, 16])).result(),
        atol=1e-5,
        rtol=0,
    )
    staged = runtime.stage(host)
    assert staged.is_pinned() and torch.equal(staged, torch.cat(host))
