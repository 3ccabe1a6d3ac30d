"""Robust image reading: EXIF rotation, grayscale, RGBA, palette and 16-bit images all become RGB."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Normalisation of every ImageNet-pretrained backbone here (ViTs, ResNets), as torchvision's transforms use it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(Exception):
    """An image that cannot be decoded; the message is the reason."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError("not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"corrupt image ({exc})") from None
    return to_rgb(img)


def read_size(path: str | os.PathLike, exif_rotation: bool = True) -> tuple[int, int]:
    """(height, width) from the file header alone; with `exif_rotation`, as `load_rgb` will see it
    (label PNGs are read as stored, so they pass False)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if exif_rotation else 1
    except FileNotFoundError:
        raise ImageReadError("file not found") from None
    except Exception as exc:  # PIL raises many types for damaged headers
        raise ImageReadError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if orientation in _ROTATED_ORIENTATIONS:
        height, width = width, height
    return height, width


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit single channel: scale the full range to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so that transparent regions do not become arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under `root`, searched recursively, as sorted paths relative to `root`."""
    root = Path(root)
    found = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)
