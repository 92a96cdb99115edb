"""One encoded image -> uint8 (H, W, C) pixels at a model's frame size.

JPEG goes through libjpeg-turbo's own interface (simplejpeg), which decodes at the same
reduced scale as Pillow's draft mode and gives the same pixels without holding the
interpreter lock; anything it does not take (PNG, WebP, BMP, CMYK JPEG, a warning) goes
through Pillow, and so does an image whose EXIF orientation says it is stored turned or
mirrored (a phone's portrait photo), which Pillow turns upright. Both then resize bilinearly
with Pillow. Training and serving both decode here, so a model is served the pixels it was
trained on.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from media.errors import BadInput, InputError, TooLarge
from media.spec import FrameFormat

IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
EXIF_SEARCH = 65536  # a JPEG's EXIF block (APP1) comes before its image data, at the start of the file


def turned(image: Image.Image) -> bool:
    """Whether ``image`` (opened, not decoded) is stored turned or mirrored, by its EXIF orientation."""
    return "exif" in image.info and image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)


def draft_scale(width: int, height: int, fmt: FrameFormat) -> int:
    """The JPEG scale (1, 2, 4 or 8) to decode at: the largest that keeps both sides at or above
    the model's, as Pillow's draft mode picks it."""
    most = min(width // fmt.width, height // fmt.height)
    return next((s for s in (8, 4, 2) if most >= s), 1)


def decode_jpeg(data: bytes, fmt: FrameFormat, max_pixels: int, index: int = 0) -> np.ndarray | None:
    """A YCbCr, RGB or grey JPEG -> uint8 (H, W, C) at its draft scale, through simplejpeg.

    None for whatever simplejpeg does not take (not a JPEG, CMYK, any error or warning):
    Pillow decodes those, or says what is wrong with them.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    if data.find(b"Exif\x00\x00", 0, EXIF_SEARCH) >= 0:
        try:
            if turned(Image.open(io.BytesIO(data))):
                return None  # Pillow turns it upright
        except Exception:  # a broken head or EXIF, of any kind: Pillow's own path says what is wrong
            return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "RGB", "Gray"):
        return None
    if width * height > max_pixels:
        raise TooLarge(f"frame {index} is {width}x{height}, more than {max_pixels} pixels")
    scale = draft_scale(width, height, fmt)
    try:
        return simplejpeg.decode_jpeg(
            data,
            "RGB" if fmt.channels == 3 else "GRAY",
            min_height=-(-height // scale),
            min_width=-(-width // scale),
            min_factor=scale,  # with the two sizes above: exactly 1/scale
        )
    except ValueError:
        return None


def pillow_image(data: bytes, fmt: FrameFormat, max_pixels: int, index: int = 0) -> Image.Image:
    """One encoded image of any supported format, decoded by Pillow in the model's mode (RGB or L)."""
    try:  # the pixel check comes before any pixel is decoded: a decompression bomb stops here
        opened = Image.open(io.BytesIO(data))
        if opened.format not in IMAGE_FORMATS:
            raise BadInput(f"frame {index} is {opened.format}; send JPEG, PNG, WebP or BMP")
        w, h = opened.size
        if w * h > max_pixels:
            raise TooLarge(f"frame {index} is {w}x{h}, more than {max_pixels} pixels")
        upright = turned(opened)
        opened.draft(fmt.mode, fmt.size)  # JPEG: decode at a reduced scale
        opened.load()
        image: Image.Image = ImageOps.exif_transpose(opened) if upright else opened
        # convert() copies even when the mode already matches
        return image if image.mode == fmt.mode else image.convert(fmt.mode)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice its pixel limit
        raise TooLarge(f"frame {index} is a decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:  # its message names the in-memory file object, an address
        raise BadInput(f"frame {index} is not a decodable image (not a known image format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"frame {index} is not a decodable image ({exc})") from exc


def decode_image(data: bytes, fmt: FrameFormat, max_pixels: int = 1 << 31, index: int = 0) -> np.ndarray:
    """One encoded image -> uint8 (H, W, C) at ``fmt``'s size; ``index`` names it in errors."""
    if not data:
        raise BadInput(f"frame {index} is empty")
    arr = decode_jpeg(data, fmt, max_pixels, index)
    if arr is None:
        img = pillow_image(data, fmt, max_pixels, index)
    elif arr.shape[:2] == (fmt.height, fmt.width):
        return arr
    else:
        img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if img.size != fmt.size:
        img = img.resize(fmt.size, Image.Resampling.BILINEAR)
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out
