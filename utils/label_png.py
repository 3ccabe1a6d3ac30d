"""Semantic label PNGs: single channel, VOC palette, 0 = background, 255 = ignore (see DESIGN.md).

Readers accept palette (P), grayscale (L), 16-bit and 1-bit PNGs, plus RGB images drawn in the VOC
colours (`index_only=True` limits them to images that store the indices themselves).
Writers always produce a VOC-palette PNG, written to a temporary name and renamed.
Class names live in utils/voc.py (`VOC_CLASSES`, `VOC_SEGMENTATION_CLASSES`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.coco_io import atomic_path
from utils.errors import UserError

IGNORE_INDEX = 255

def voc_palette() -> np.ndarray:
    """The standard 256-entry PASCAL VOC colour map, shape (256, 3), uint8 (255 is (224, 224, 192))."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):  # spread the bits of the index over the high bits of R, G and B
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


_PALETTE = voc_palette()


def label_to_image(label: np.ndarray) -> Image.Image:
    """HxW integer class map (values 0..255) -> VOC-palette PIL image."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a label map must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("label values must lie in [0, 255]")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE.reshape(-1).tolist())
    return img


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write a VOC-palette label PNG atomically (temporary name, then rename)."""
    img = label_to_image(label)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike, index_only: bool = False) -> np.ndarray:
    """Read a label PNG as an HxW uint8 class map; raise UserError naming the file if it cannot be used.

    Palette and grayscale PNGs give their raw index values, 16-bit ones too when they fit in [0, 255].
    Unless `index_only`, a 1-bit PNG gives 0/255 and an RGB(A) image drawn in VOC colours gives the
    indices of its colours; `index_only=True` refuses both (instance maps, where neither reading is safe).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read label file {path}: {exc}") from None
    if mode in ("P", "L"):
        return array.astype(np.uint8)
    if index_only and mode in ("1", "RGB", "RGBA"):
        hint = " (was it saved as RGB?)" if mode.startswith("RGB") else ""
        raise UserError(f"label file {path} has image mode {mode}; expected a palette or grayscale PNG of "
                        f"class/instance indices{hint}")
    if mode == "1":
        return array.astype(np.uint8) * 255
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise UserError(f"label file {path} has values outside [0, 255]")
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return _colours_to_label(array[..., :3], path)
    raise UserError(f"label file {path} has unsupported image mode {mode}; expected a palette or grayscale PNG")


def _colours_to_label(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map an RGB rendering in VOC colours back to class indices."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (_PALETTE[:, 0].astype(np.int64) << 16) | (_PALETTE[:, 1].astype(np.int64) << 8) | _PALETTE[:, 2]
    lookup = {int(c): i for i, c in enumerate(palette_codes)}
    unique, inverse = np.unique(codes, return_inverse=True)
    indices = np.empty(unique.size, dtype=np.uint8)
    for k, code in enumerate(unique):
        if int(code) not in lookup:
            colour = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
            raise UserError(f"label file {path} is RGB and contains colour {colour}, which is not a VOC palette colour")
        indices[k] = lookup[int(code)]
    return indices[inverse].reshape(codes.shape)


def check_label_values(label: np.ndarray, num_classes: int, path: str | os.PathLike) -> None:
    """Every pixel must be a class in [0, num_classes) or the ignore value 255."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise UserError(f"label file {path} has class id {int(bad[0])} outside [0, {num_classes}) "
                        f"(255 is the only other value allowed)")
