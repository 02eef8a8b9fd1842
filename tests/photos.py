"""Photos the tests make themselves, so the suite needs nothing beside the repository.

Like the dataset's, they are camera-sized and camera-shaped: smooth light, a garment-like shape on a
background, sensor noise, saved as baseline JPEG at quality 90 (400x533 by default, the dataset's usual size).
The same seed gives the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The dataset's photos are mostly 400x533 (portrait).
PHOTO_SIZE = (400, 533)


def photo(seed: int = 0, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """An RGB image: a lit background, a blob of cloth colour with folds, and noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.6 + 0.4 * np.cos((x / width - rng.uniform(0.2, 0.8)) * np.pi) * np.cos((y / height - 0.4) * np.pi / 2)
    background = rng.uniform(150, 240, 3)
    cloth = rng.uniform(20, 220, 3)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.4, 0.6)
    rx, ry = width * rng.uniform(0.2, 0.35), height * rng.uniform(0.25, 0.4)
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    folds = 0.85 + 0.15 * np.sin(x / rng.uniform(6, 20) + y / rng.uniform(15, 40))
    pixels = np.where(inside[..., None], cloth * folds[..., None], background) * light[..., None]
    pixels += rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg(
    seed: int = 0, size: tuple[int, int] = PHOTO_SIZE, quality: int = 90, exif_orientation: int | None = None
) -> bytes:
    """A generated photo as JPEG bytes; `exif_orientation` adds the EXIF tag a phone camera writes."""
    buffer = io.BytesIO()
    image = photo(seed, size)
    options = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # Orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png(seed: int = 0, size: tuple[int, int] = PHOTO_SIZE, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    photo(seed, size).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()
