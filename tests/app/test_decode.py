"""JPEG frames through libjpeg-turbo's own interface (simplejpeg): the same pixels as Pillow's decoder."""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.decode import InputLimits, decode_image, decode_jpeg
from app.errors import ApiError
from tests.app.conftest import encode


def limits(channels: int = 3, size: int = 64) -> InputLimits:
    return InputLimits(size, size, channels, 16, 16, 4096 * 4096)


def pillow_reference(data: bytes, lim: InputLimits) -> np.ndarray:
    """What the server decoded before simplejpeg, and what training decodes: Pillow's draft mode,
    a conversion to the model's channels, then a bilinear resize to its size."""
    mode = "RGB" if lim.channels == 3 else "L"
    with Image.open(io.BytesIO(data)) as img:
        img.draft(mode, (lim.width, lim.height))
        out = img.convert(mode)
        if out.size != (lim.width, lim.height):
            out = out.resize((lim.width, lim.height), Image.Resampling.BILINEAR)
        arr = np.asarray(out, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: chroma and fine detail that a wrong decode would change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)


VARIANTS: dict[str, dict[str, Any]] = {
    "baseline-420": {"quality": 90},
    "baseline-444": {"quality": 95, "subsampling": 0},
    "baseline-422": {"quality": 75, "subsampling": 1},
    "progressive": {"quality": 80, "progressive": True},
}


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("size", [(64, 64), (224, 200), (130, 70), (20, 50), (7, 9)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_jpeg_frames_decode_to_the_same_pixels_as_pillow(variant: str, size: tuple[int, int], channels: int) -> None:
    data = encode(picture(*size), "JPEG", **VARIANTS[variant])
    lim = limits(channels)
    assert decode_jpeg(data, lim, 0) is not None  # the fast path took it
    got = decode_image(data, lim, 0)
    assert got.shape == (64, 64, channels) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pillow_reference(data, lim))


@pytest.mark.parametrize("channels", [3, 1])
def test_a_grey_jpeg_decodes_as_pillow_converts_it(channels: int) -> None:
    data = encode(picture(96, 96)[..., 0], "JPEG")
    lim = limits(channels)
    assert decode_jpeg(data, lim, 0) is not None
    np.testing.assert_array_equal(decode_image(data, lim, 0), pillow_reference(data, lim))


def test_a_cmyk_jpeg_is_left_to_pillow() -> None:
    buf = io.BytesIO()
    Image.fromarray(picture(64, 64)).convert("CMYK").save(buf, format="JPEG")
    data, lim = buf.getvalue(), limits()
    assert decode_jpeg(data, lim, 0) is None
    np.testing.assert_array_equal(decode_image(data, lim, 0), pillow_reference(data, lim))


def test_png_frames_are_not_taken_by_the_jpeg_path() -> None:
    data, lim = encode(picture(64, 64), "PNG"), limits()
    assert decode_jpeg(data, lim, 0) is None
    np.testing.assert_array_equal(decode_image(data, lim, 0), picture(64, 64))


def test_a_truncated_jpeg_gets_pillows_error_for_its_frame() -> None:
    data = encode(picture(64, 64), "JPEG")
    with pytest.raises(ApiError) as err:
        decode_image(data[: len(data) // 2], limits(), 3)
    assert err.value.status == 400 and "frame 3" in err.value.message


def claim_size(data: bytes, height: int, width: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) claiming another size: a bomb behind a small file."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    raise AssertionError("no frame header")


def test_the_pixel_limit_is_checked_from_the_jpeg_header_before_decoding() -> None:
    data = claim_size(encode(picture(64, 64), "JPEG"), 30000, 30000)
    with pytest.raises(ApiError) as err:
        decode_image(data, InputLimits(64, 64, 3, 16, 16, 1024 * 1024), 0)
    assert err.value.status == 413
    assert "30000x30000" in err.value.message
