"""Perturbed predictions made from COCO ground truth, for tests and benchmarks of the evaluators.

`perturbed_predictions(gt, seed)` turns a COCO dataset's objects into a results list that scores
somewhere between 0 and 100 AP: jittered masks and boxes, some objects relabelled or dropped, and
false positives; masks come in all three COCO encodings (polygons, str-RLE, uncompressed RLE).
"""
from __future__ import annotations

import numpy as np

from utils.coco_io import decode_segmentation, make_annotation, mask_to_rle


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Binary HxW mask -> uncompressed COCO RLE: column-major run lengths, starting with a run of 0s
    (of length 0 when the first pixel is set)."""
    flat = mask.flatten(order="F").astype(np.int64)
    starts = np.flatnonzero(np.diff(flat)) + 1  # where a new run begins
    bounds = np.concatenate([[0], starts, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def perturbed_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """GT objects jittered (shifted masks, moved boxes, some relabelled), 20% dropped, plus false positives;
    masks as str-RLE, polygons and uncompressed RLE."""
    rng = np.random.default_rng(seed)
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    preds = []
    for ann in gt["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.2:  # dropped
            continue
        img = images[ann["image_id"]]
        h, w = img["height"], img["width"]
        dx, dy = rng.integers(-6, 7, size=2)
        category = ann["category_id"] if rng.random() > 0.15 else int(rng.choice(cat_ids))
        score = float(rng.random())
        x, y, bw, bh = ann["bbox"]
        box = [x + float(dx), y + float(dy), bw * float(rng.uniform(0.85, 1.15)), bh * float(rng.uniform(0.85, 1.15))]
        kind = rng.integers(3)
        if kind == 0:  # shifted polygon
            polys = [[v + (dx if i % 2 == 0 else dy) for i, v in enumerate(p)] for p in ann["segmentation"]]
            polys = [[float(min(max(v, 0), (w if i % 2 == 0 else h))) for i, v in enumerate(p)] for p in polys]
            segm = polys
        else:
            mask = np.roll(decode_segmentation(ann["segmentation"], h, w), (int(dy), int(dx)), axis=(0, 1))
            if kind == 1:
                segm = mask_to_rle(mask)
            else:  # uncompressed RLE
                segm = uncompressed_rle(mask)
        preds.append({"image_id": ann["image_id"], "category_id": category, "segmentation": segm,
                      "bbox": box, "score": score})
    for _ in range(60):  # false positives
        img = gt["images"][int(rng.integers(len(gt["images"])))]
        h, w = img["height"], img["width"]
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[y0:y0 + int(rng.integers(5, 200)), x0:x0 + int(rng.integers(5, 200))] = 1
        preds.append(make_annotation(mask, img["id"], int(rng.choice(cat_ids)), float(rng.random())))
    return preds
