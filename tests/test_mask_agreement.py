"""Agreement of two mask sets (distill/quality.py): Hungarian-matched mask IoU per image and per file,
as used for bf16 vs fp32 (benchmarks/bench_gen_masks.py --mode half_agreement) and for this code
against the official implementations (benchmarks/bench_official_agreement.py)."""
from __future__ import annotations

import numpy as np
import pytest

from distill.quality import mask_file_agreement, matched_mask_iou
from utils.coco_io import mask_to_rle
from utils.errors import UserError


def _box(top: int, left: int, height: int, width: int, shape=(4, 5)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


def test_matched_mask_iou_pairs_masks_one_to_one():
    top_left, bottom_right = _box(0, 0, 2, 2), _box(2, 3, 2, 2)
    wider = _box(0, 0, 2, 3)  # IoU 4/6 with top_left, 0 with bottom_right
    # The order of the masks does not matter: bottom_right <-> bottom_right (1), top_left <-> wider (2/3).
    assert matched_mask_iou([top_left, bottom_right], [bottom_right, wider]) == pytest.approx((1 + 4 / 6) / 2)
    # A mask without a partner counts 0: the sum is divided by the larger count.
    assert matched_mask_iou([top_left, bottom_right, _box(3, 0, 1, 1)], [bottom_right, wider]) == pytest.approx(
        (1 + 4 / 6) / 3)
    # One-to-one: two copies of one mask cannot both match it.
    assert matched_mask_iou([top_left, top_left], [top_left]) == pytest.approx(0.5)
    assert matched_mask_iou([], []) == 1.0
    assert matched_mask_iou([top_left], []) == 0.0 and matched_mask_iou([], [top_left]) == 0.0


def _coco(masks_per_image: dict[str, list[np.ndarray]], swap_size: bool = False) -> dict:
    images, annotations = [], []
    for image_id, (name, masks) in enumerate(masks_per_image.items(), start=1):
        height, width = (4, 5) if not swap_size else (5, 4)
        images.append({"id": image_id, "file_name": f"sub/{name}", "height": height, "width": width})
        for mask in masks:
            rle = mask_to_rle(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()
                                                 if isinstance(rle["counts"], bytes) else rle["counts"]}})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}


def test_mask_file_agreement_per_image_by_name():
    top_left, bottom_right, wider = _box(0, 0, 2, 2), _box(2, 3, 2, 2), _box(0, 0, 2, 3)
    ours = _coco({"a.jpg": [top_left, bottom_right], "b.jpg": [wider], "c.jpg": []})
    # The other file lists the images in another order, in another folder, with width and height swapped
    # (as CutLER's maskcut.py writes them): RLEs are decoded at their own size and matched by base name.
    theirs = _coco({"c.jpg": [], "b.jpg": [top_left], "a.jpg": [bottom_right, top_left]}, swap_size=True)
    assert mask_file_agreement(ours, theirs) == pytest.approx({"a.jpg": 1.0, "b.jpg": 4 / 6, "c.jpg": 1.0})
    with pytest.raises(UserError, match=r"the two mask files list different images \(1 only in the first, e.g. \['c.jpg'\]; "
                                          r"1 only in the second, e.g. \['d.jpg'\]\)"):
        mask_file_agreement(ours, _coco({"a.jpg": [], "b.jpg": [], "d.jpg": []}))
