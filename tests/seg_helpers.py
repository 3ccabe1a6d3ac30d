"""Test-made segmentation data for the tests/test_seg_*.py files: small images with coloured squares."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils.label_png import write_label_png

COLOURS = {1: (220, 40, 40), 2: (40, 200, 60)}


def make_synthetic_set(root: Path, count: int = 6, size: int = 64, seed: int = 0) -> dict:
    """Images with one square of class 1 (red) or 2 (green) on a dark noisy background, and their labels."""
    rng = np.random.default_rng(seed)
    image_dir, label_dir = root / "images", root / "labels"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        cls = 1 + i % 2
        image = np.full((size, size, 3), 40, dtype=np.float64)
        label = np.zeros((size, size), dtype=np.uint8)
        side = size // 2
        y, x = rng.integers(0, size - side, 2)
        image[y:y + side, x:x + side] = COLOURS[cls]
        label[y:y + side, x:x + side] = cls
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        name = f"img_{i:03d}"
        Image.fromarray(image).save(image_dir / f"{name}.png")
        write_label_png(label_dir / f"{name}.png", label)
        names.append(name)
    list_path = root / "train.txt"
    list_path.write_text("".join(n + "\n" for n in names))
    return {"image_dir": image_dir, "label_dir": label_dir, "list": list_path, "names": names}


def tiny_overrides(data: dict, num_classes: int = 3) -> list[str]:
    """`--set` overrides pointing configs/segmentation/tiny_test.yml at a synthetic set (train = val)."""
    return [f"data.image_dir={data['image_dir']}", f"data.label_dir={data['label_dir']}",
            f"data.train_list={data['list']}", f"data.val_image_dir={data['image_dir']}",
            f"data.val_label_dir={data['label_dir']}", f"data.val_list={data['list']}",
            f"data.num_classes={num_classes}"]
