"""COCO-JSON instance datasets and the inference loader for Mask R-CNN (training batches come from
utils/samplers.py).

Contiguous labels: the dataset's category ids, sorted, become labels 1..K (0 is background);
`category_ids[label - 1]` maps a prediction back. Randomness (shuffling, flips) depends only on
(seed, sample position), never on worker processes or global RNG state, so that a resumed run
sees exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.coco_io import OBJECT_CATEGORY, decode_segmentation, load_coco_dataset, mask_to_bbox, xywh_to_xyxy
from utils.errors import UserError
from utils.images import ImageReadError, load_rgb


def categories_of(dataset: dict, class_agnostic: bool = False) -> list[dict]:
    """The categories training uses, in label order (label = index + 1)."""
    if class_agnostic:
        return [{"id": OBJECT_CATEGORY["id"], "name": OBJECT_CATEGORY["name"]}]
    cats = sorted(dataset["categories"], key=lambda c: c["id"])
    if not cats:  # pseudo-labels without a category list: take the ids the annotations use
        ids = sorted({a.get("category_id", 1) for a in dataset["annotations"]}) or [1]
        cats = [{"id": i, "name": f"class_{i}"} for i in ids]
    return [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in cats]


class CocoInstances(Dataset):
    """Images of a COCO dataset with their instances as torchvision detection targets.

    Items are `(image, target)`; `image` is a float (3, H, W) tensor in [0, 1]; `target` holds
    `boxes` (xyxy), `labels`, `masks` (uint8, N x H x W) and `image_id`. Crowd regions and
    degenerate boxes are skipped; images without instances are kept (negatives) unless
    `filter_empty`. The index may be `(index, position)` from `utils.samplers`; the position
    seeds the horizontal flip and `augment(dataset, image, target, position)` (e.g. copy_paste.CopyPaste),
    which run on such training samples only.
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike,
                 categories: list[dict] | None = None, class_agnostic: bool = False,
                 filter_empty: bool = False, flip_prob: float = 0.0, seed: int = 0,
                 with_targets: bool = True, augment: Callable | None = None):
        self.json_path = str(json_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise UserError(f"image root not found: {self.image_root}")
        data = load_coco_dataset(json_path)
        self.class_agnostic = class_agnostic
        self.categories = categories if categories is not None else categories_of(data, class_agnostic)
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.with_targets = with_targets
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.augment = augment
        anns_by_image: dict[int, list[dict]] = {}
        for i, ann in enumerate(data["annotations"]):
            if ann.get("iscrowd", 0):
                continue
            if with_targets and not class_agnostic and ann.get("category_id") not in self.label_of:
                raise UserError(f"{json_path}: annotation #{i} has category_id {ann.get('category_id')} "
                                f"which is not among the training categories {sorted(self.label_of)}")
            if with_targets and "segmentation" not in ann:
                raise UserError(f"{json_path}: annotation #{i} has no 'segmentation'; Mask R-CNN needs masks")
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        self.images = []
        for img in data["images"]:
            if "file_name" not in img:
                raise UserError(f"{json_path}: image {img['id']} has no 'file_name'")
            if filter_empty and not anns_by_image.get(img["id"]):
                continue
            self.images.append(img)
        if not self.images:
            raise UserError(f"{json_path}: no images to use")
        missing = [img["file_name"] for img in self.images if not (self.image_root / img["file_name"]).is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) of {json_path} are missing under {self.image_root}, "
                            f"e.g. {missing[0]}")
        self.anns_by_image = anns_by_image

    def __len__(self) -> int:
        return len(self.images)

    def num_objects(self) -> int:
        """Training objects of the used images: non-crowd annotations, less boxes under 1 px (`target` skips
        them; a mask without a `bbox` counts)."""
        return sum(1 for img in self.images for ann in self.anns_by_image.get(img["id"], [])
                   if "bbox" not in ann or (ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1))

    def load_image(self, info: dict) -> torch.Tensor:
        path = self.image_root / info["file_name"]
        try:
            pil = load_rgb(path)
        except ImageReadError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        if pil.size != (info["width"], info["height"]):
            raise UserError(f"image {path} is {pil.size[0]}x{pil.size[1]} but {self.json_path} says "
                            f"{info['width']}x{info['height']}")
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255.0)

    def target(self, info: dict) -> dict:
        h, w = info["height"], info["width"]
        boxes, labels, masks = [], [], []
        for ann in self.anns_by_image.get(info["id"], []):
            mask = decode_segmentation(ann["segmentation"], h, w)
            xyxy = xywh_to_xyxy(ann["bbox"] if "bbox" in ann else mask_to_bbox(mask))[0]
            if xyxy[2] - xyxy[0] < 1 or xyxy[3] - xyxy[1] < 1:
                continue  # degenerate boxes break the box coder (torchvision rejects them)
            boxes.append(xyxy)
            labels.append(1 if self.class_agnostic else self.label_of[ann["category_id"]])
            masks.append(mask)
        return {
            "boxes": torch.as_tensor(np.array(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            "image_id": info["id"],
        }

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index, position = item if isinstance(item, tuple) else (item, None)
        info = self.images[index]
        image = self.load_image(info)
        if not self.with_targets:
            return image, {"image_id": info["id"], "height": info["height"], "width": info["width"]}
        target = self.target(info)
        if position is not None and self.flip_prob > 0:
            if np.random.default_rng([self.seed, position]).random() < self.flip_prob:
                image, target = hflip(image, target)
        if position is not None and self.augment is not None:
            image, target = self.augment(self, image, target, position)
        return image, target


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate_lists(batch: list) -> tuple:
    return tuple(zip(*batch))


def inference_loader(dataset: CocoInstances, rank: int, world_size: int, num_workers: int,
                     batch_size: int = 1) -> DataLoader:
    """This process's share of the images (every world_size-th), in dataset order."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=collate_lists)
