"""A stranger's image bytes, decoded safely: refused when they are not an image or too large, then turned upright
and made 8-bit RGB. For an ordinary RGB JPEG the pixels are exactly what keras-image-helper decodes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from contract import IMAGE_SIZE
from gateway_parts.errors import GatewayError

Image.MAX_IMAGE_PIXELS = None  # the gateway checks the pixel count itself, with its own limit and error
# A JPEG decoded at reduced scale (draft) stays at least this many times the model's input size, so the
# nearest-neighbour resize still samples a grid as fine as the full image would give.
DRAFT_FACTOR = 2
_WIDE_GRAYSCALE = ("I;16", "I;16B", "I;16L", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_image(data: bytes, max_pixels: int, jpeg_draft: bool = True) -> Image.Image:
    """Open image bytes, refusing what is not an image (415), is broken (422) or has more than `max_pixels` (413,
    checked before decoding: a small file can hold a huge image). Large JPEGs are decoded at reduced scale."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise GatewayError(415, "unsupported_media_type", "the data is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:  # an image type, but a broken header
        raise GatewayError(422, "undecodable_image", f"the image could not be decoded: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise GatewayError(
            413,
            "image_too_large",
            f"the image is {width}x{height} ({width * height:,} pixels); the limit is {max_pixels:,}",
        )
    if jpeg_draft and image.format == "JPEG":
        image.draft(image.mode, (IMAGE_SIZE[0] * DRAFT_FACTOR, IMAGE_SIZE[1] * DRAFT_FACTOR))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise GatewayError(422, "undecodable_image", f"the image could not be decoded: {error}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (as its EXIF orientation says), first frame, 8-bit RGB; transparent pixels laid on white."""
    ImageOps.exif_transpose(image, in_place=True)  # turns only when the EXIF tag says so; no copy otherwise
    if image.mode in _WIDE_GRAYSCALE:
        # 16-bit and wider grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def scale(values: np.ndarray) -> np.ndarray:
    """Xception's scaling of uint8 pixels to float32 in [-1, 1] (x / 127.5 - 1): what the course's signature takes."""
    return values.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
