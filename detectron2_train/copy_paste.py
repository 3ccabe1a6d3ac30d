"""Copy-paste augmentation as CutLER trains with it (Wang et al. 2023; after Ghiasi et al. 2021).

With probability `rate`, a training sample receives objects of another training image: the
source image and its masks are rescaled to `ratio` x the target's size (ratio drawn uniformly
from [min_ratio, max_ratio]), placed at a random offset, and some of its objects (a random
number from 1 to n - 1 of its n objects with `random_num`, else all) are pasted. As in CutLER, a
pasted object that would cover half or more of an existing object is not pasted. Pasted pixels
occlude what was there: the existing masks lose them, objects left without pixels are dropped,
and the boxes of occluded objects are recomputed from their masks (pasted objects get their
masks' boxes too).

Every draw comes from a generator seeded with (seed, sample position), so a resumed run pastes
exactly what an uninterrupted one did. The dataset calls `CopyPaste` on each training sample.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from detectron2_train.data import hflip
from utils.coco_io import mask_to_bbox, xywh_to_xyxy
from utils.errors import UserError

OCCLUSION_LIMIT = 0.5  # a pasted object may cover less than this fraction of any existing object


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) of (N, H, W) masks, float32 (N, 4)."""
    boxes = [xywh_to_xyxy(mask_to_bbox(m))[0] for m in masks.cpu().numpy()]
    return torch.as_tensor(np.array(boxes, dtype=np.float32).reshape(-1, 4))


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) float -> (C, *size), bilinear; unchanged when the size already fits."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def paste_objects(image: torch.Tensor, target: dict, source_image: torch.Tensor, source_target: dict,
                  rng: np.random.Generator, min_ratio: float = 0.5, max_ratio: float = 1.0,
                  random_num: bool = True) -> tuple[torch.Tensor, dict]:
    """Paste objects of (source_image, source_target) into (image, target); returns new ones.

    Images are float (3, H, W); targets hold `boxes` (xyxy), `labels` and uint8 `masks` (N, H, W).
    """
    n = len(source_target["labels"])
    if n == 0:
        return image, target
    num_copy = (1 if n == 1 else int(rng.integers(1, n))) if random_num else n
    chosen = torch.as_tensor(np.sort(rng.choice(n, num_copy, replace=False)))
    height, width = image.shape[-2:]
    ratio = float(rng.uniform(min_ratio, max_ratio))
    h, w = max(int(ratio * height), 1), max(int(ratio * width), 1)
    y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))

    pasted = torch.zeros((num_copy, height, width), dtype=torch.bool)
    pasted[:, y0:y0 + h, x0:x0 + w] = _resize(source_target["masks"][chosen].float(), (h, w)) >= 0.5
    keep = pasted.flatten(1).any(dim=1)  # an object can vanish when shrunk
    existing = target["masks"].bool()
    if len(existing):
        inter = pasted.flatten(1).float() @ existing.flatten(1).float().T  # (pasted, existing)
        covered = inter / existing.flatten(1).sum(dim=1).clamp(min=1).float()
        keep &= covered.max(dim=1).values < OCCLUSION_LIMIT
    if not bool(keep.any()):
        return image, target
    pasted, labels = pasted[keep], source_target["labels"][chosen][keep]

    alpha = pasted.any(dim=0)
    canvas = torch.zeros_like(image)
    canvas[:, y0:y0 + h, x0:x0 + w] = _resize(source_image, (h, w))
    new_image = torch.where(alpha, canvas, image)

    remaining = existing & ~alpha
    occluded = (remaining != existing).flatten(1).any(dim=1)
    visible = remaining.flatten(1).any(dim=1)
    boxes = target["boxes"].clone()
    if bool(occluded.any()):
        boxes[occluded] = mask_boxes(remaining[occluded]).to(boxes.dtype)
    new_target = dict(target)
    new_target["masks"] = torch.cat([remaining[visible], pasted]).to(torch.uint8)
    new_target["boxes"] = torch.cat([boxes[visible], mask_boxes(pasted).to(boxes.dtype)])
    new_target["labels"] = torch.cat([target["labels"][visible], labels.to(target["labels"].dtype)])
    return new_image, new_target


class CopyPaste:
    """The dataset hook: `(dataset, image, target, position) -> (image, target)`.

    The source is another sample of the same dataset, read without augmentation and flipped
    with the dataset's flip probability.
    """

    def __init__(self, rate: float, min_ratio: float = 0.5, max_ratio: float = 1.0, random_num: bool = True,
                 seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise UserError(f"input.copy_paste.rate must be in [0, 1], got {rate}")
        if not 0.0 < min_ratio <= max_ratio <= 1.0:
            raise UserError(f"input.copy_paste needs 0 < min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}")
        self.rate, self.min_ratio, self.max_ratio = float(rate), float(min_ratio), float(max_ratio)
        self.random_num, self.seed = bool(random_num), int(seed)

    @classmethod
    def from_config(cls, cfg: dict, seed: int) -> "CopyPaste | None":
        """From the `input.copy_paste` section; None when its rate is 0 (off)."""
        if not float(cfg["rate"]):
            return None
        return cls(float(cfg["rate"]), float(cfg["min_ratio"]), float(cfg["max_ratio"]), bool(cfg["random_num"]), seed)

    def __call__(self, dataset, image: torch.Tensor, target: dict, position: int) -> tuple[torch.Tensor, dict]:
        rng = np.random.default_rng([self.seed, position, 1])  # (seed, position) alone seeds the flip
        if rng.random() >= self.rate:
            return image, target
        source_image, source_target = dataset[int(rng.integers(len(dataset)))]
        if rng.random() < dataset.flip_prob:
            source_image, source_target = hflip(source_image, source_target)
        return paste_objects(image, target, source_image, source_target, rng, self.min_ratio, self.max_ratio,
                             self.random_num)
