"""One image to a model's frame: JPEG through libjpeg-turbo's own interface (simplejpeg) gives the same
pixels as Pillow's decoder; other formats, errors and the pixel limit."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from media import BadInput, FrameFormat, TooLarge, decode_image
from media.images import decode_jpeg
from tests.support.media import claim_size, encode, picture

MAX_PIXELS = 4096 * 4096


def fmt(channels: int = 3, size: int = 64) -> FrameFormat:
    return FrameFormat(size, size, channels)


def pillow_reference(data: bytes, target: FrameFormat) -> np.ndarray:
    """Pillow's own way: draft mode, a conversion to the model's channels, then a bilinear resize."""
    mode = "RGB" if target.channels == 3 else "L"
    with Image.open(io.BytesIO(data)) as img:
        img.draft(mode, (target.width, target.height))
        out = img.convert(mode)
        if out.size != (target.width, target.height):
            out = out.resize((target.width, target.height), Image.Resampling.BILINEAR)
        arr = np.asarray(out, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


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
    target = fmt(channels)
    assert decode_jpeg(data, target, MAX_PIXELS) is not None  # the fast path took it
    got = decode_image(data, target)
    assert got.shape == (64, 64, channels) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pillow_reference(data, target))


@pytest.mark.parametrize("channels", [3, 1])
def test_a_grey_jpeg_decodes_as_pillow_converts_it(channels: int) -> None:
    data = encode(picture(96, 96)[..., 0], "JPEG")
    target = fmt(channels)
    assert decode_jpeg(data, target, MAX_PIXELS) is not None
    np.testing.assert_array_equal(decode_image(data, target), pillow_reference(data, target))


def test_a_cmyk_jpeg_is_left_to_pillow() -> None:
    buf = io.BytesIO()
    Image.fromarray(picture(64, 64)).convert("CMYK").save(buf, format="JPEG")
    data, target = buf.getvalue(), fmt()
    assert decode_jpeg(data, target, MAX_PIXELS) is None
    np.testing.assert_array_equal(decode_image(data, target), pillow_reference(data, target))


def test_png_frames_are_not_taken_by_the_jpeg_path() -> None:
    data, target = encode(picture(64, 64), "PNG"), fmt()
    assert decode_jpeg(data, target, MAX_PIXELS) is None
    np.testing.assert_array_equal(decode_image(data, target), picture(64, 64))


def test_a_truncated_jpeg_gets_pillows_error_for_its_frame() -> None:
    data = encode(picture(64, 64), "JPEG")
    with pytest.raises(BadInput, match="frame 3"):
        decode_image(data[: len(data) // 2], fmt(), index=3)


def test_the_pixel_limit_is_checked_from_the_jpeg_header_before_decoding() -> None:
    data = claim_size(encode(picture(64, 64), "JPEG"), 30000, 30000)
    with pytest.raises(TooLarge, match="30000x30000"):
        decode_image(data, fmt(), max_pixels=1024 * 1024)
