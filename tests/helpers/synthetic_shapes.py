"""A small synthetic instance dataset (coloured rectangles and ellipses on noise) in COCO JSON.

Used by the tests and the benchmark: it needs no downloads, and a tiny Mask R-CNN learns it
in a few hundred CPU iterations.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from utils.coco_io import make_annotation, write_json

CATEGORIES = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = (int(v) for v in rng.integers(size // 4, size // 2, 2))
    y0, x0 = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
    mask = np.zeros((size, size), dtype=np.uint8)
    if kind == 1:
        mask[y0:y0 + h, x0:x0 + w] = 1
    else:
        yy, xx = np.mgrid[:size, :size]
        cy, cx = y0 + (h - 1) / 2, x0 + (w - 1) / 2
        mask[((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1] = 1
    return mask, (y0, x0)


def make_dataset(root: str | os.PathLike, num_images: int = 8, size: int = 64, seed: int = 0,
                 max_objects: int = 2, categories: tuple[int, ...] = (1, 2), empty_images: int = 0) -> Path:
    """Write `num_images` PNGs under root/images and root/annotations.json; returns the JSON path.

    Objects do not overlap. Rectangles are reddish, ellipses bluish; `empty_images` extra images
    hold only noise.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {1: np.array([220, 60, 40]), 2: np.array([40, 80, 220])}
    images, annotations = [], []
    for image_id in range(1, num_images + empty_images + 1):
        pixels = rng.integers(0, 90, (size, size, 3)).astype(np.float64)
        occupied = np.zeros((size, size), dtype=bool)
        n_objects = 0 if image_id > num_images else int(rng.integers(1, max_objects + 1))
        for _ in range(n_objects):
            kind = int(rng.choice(categories))
            for _attempt in range(20):
                mask, _ = _shape_mask(kind, size, rng)
                if not (occupied & mask.astype(bool)).any():
                    break
            else:
                continue
            occupied |= mask.astype(bool)
            pixels[mask.astype(bool)] = colours[kind] + rng.normal(0, 10, 3)
            annotations.append(make_annotation(mask, image_id, kind, 1.0, ann_id=len(annotations) + 1))
        name = f"{image_id:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    for ann in annotations:
        ann.pop("score", None)
    path = root / "annotations.json"
    write_json(path, {"images": images, "annotations": annotations,
                      "categories": [c for c in CATEGORIES if c["id"] in categories]})
    return path
