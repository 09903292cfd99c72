"""Reading image files into the arrays the rest of the library expects.

Arrays are numpy, HWC, channel order RGB, uint8 in [0, 255]; grayscale images stay (H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


class ImageError(ValueError):
    """An image file cannot be read or is not usable; the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """8-bit image as (H, W, 3) RGB uint8, or (H, W) uint8 when the file is grayscale.

    Palette, CMYK and alpha images are converted to RGB (alpha dropped); 16-bit grayscale is
    scaled to 8 bits. For full-depth and alpha-preserving handling see :mod:`vdsr.upscale`.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("L", "1"):
                return np.asarray(image.convert("L"))
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                return (np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Image.DecompressionBombError as error:  # not an OSError: a header claiming > 179 Mpixels
        raise ImageError(f"{path}: too large to read ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: not a readable image ({error})") from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` (by suffix), sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ImageError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files
