"""CorLoc for single-object discovery (LOST, TokenCut, ...): the percentage of images whose most
confident predicted box has IoU >= 0.5 with at least one GT box.

The protocol is LOST's (valeoai/LOST `main_lost.py`, `main_corloc_evaluation.py`, `datasets.py`):
- Only the most confident prediction of an image counts (ties: the first in the file). An image
  without any prediction is a miss.
- Every image of the ground truth is counted, also one without any GT box (a miss).
- VOC: every object counts, difficult and truncated ones included. `no_hard` drops objects marked
  difficult or truncated, and then skips (does not count) images left without an object.
- COCO: crowd regions are never GT boxes. An image whose only objects are crowd regions is a miss,
  unless `no_hard`, which skips it. GT boxes are rounded to whole pixels as corners
  (`round(x)`, `round(y)`, `round(x + w)`, `round(y + h)`, half to even, as Python's `round`).
- VOC XML boxes move to pixel edges (`xmin - 1`, `ymin - 1`; see `utils.voc.parse_voc_xml`).
- IoU >= 0.5 exactly (LOST adds 1e-7 to its IoU denominators but computes in float32, where that
  vanishes for boxes of a pixel or more: an IoU of exactly 0.5 is correct in both).
The result says how many images were counted, and how many were skipped and why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from evaluation.most_confident import most_confident
from evaluation.rows import MetricRow
from utils.coco_io import (box_iou_xywh, load_coco_dataset, load_predictions, match_by_file_name, names_all_images,
                           segmentation_to_rle, unknown_image_id)
from utils.errors import UserError
from utils.validate import check_mask_fits_image
from utils.voc import parse_voc_xml, read_image_set, voc_image_id


@dataclass
class GroundTruthBoxes:
    """Per image: a name for messages and its GT boxes `[x, y, w, h]` (N, 4)."""

    boxes: dict = field(default_factory=dict)  # image key -> np.ndarray (N, 4)
    sizes: dict = field(default_factory=dict)  # image key -> (height, width)
    source: str = ""
    no_hard: bool = False
    removed: str = ""  # what was removed from the GT, for the report
    images: list = field(default_factory=list)  # the COCO GT's images (file names: predictions are matched by them)


@dataclass
class CorLocResult:
    corloc: float  # percent of the counted images
    num_correct: int
    num_images: int  # counted: the denominator
    num_gt_images: int  # every image of the ground truth
    num_without_prediction: int  # counted, misses
    num_without_gt: int  # counted, misses (no GT box; without --no_hard)
    num_skipped: int  # not counted: no GT box left with --no_hard
    per_image: dict  # image key -> bool, for the counted images
    removed: str = ""
    matched_by: str = "image_id"  # how predictions were matched to GT images: image_id or file_name
    iou_threshold: float = 0.5

    def summary(self) -> str:
        skipped = f", {self.num_skipped} skipped (no GT box left after --no_hard)" if self.num_skipped else ""
        removed = f" ({self.removed})" if self.removed else ""
        matched = " (the predictions' images, matched by file_name)" if self.matched_by == "file_name" else ""
        return (f"{self.num_images} of {self.num_gt_images} ground-truth images counted{matched}{skipped}; "
                f"{self.num_correct} correctly localised; misses include {self.num_without_prediction} without "
                f"a prediction and {self.num_without_gt} without a GT box{removed}")

    def to_json(self) -> dict:
        return {"CorLoc": self.corloc, "num_correct": self.num_correct, "num_images": self.num_images,
                "num_gt_images": self.num_gt_images, "num_without_prediction": self.num_without_prediction,
                "num_without_gt": self.num_without_gt, "num_skipped": self.num_skipped,
                "denominator": "images of the ground truth, less those skipped: with --no_hard, images left "
                               "without a GT box are skipped; otherwise they are counted as misses",
                "gt_removed": self.removed, "matched_by": self.matched_by,
                "per_image": {str(k): v for k, v in self.per_image.items()}}


def gt_from_coco(path: str | os.PathLike, no_hard: bool = False) -> GroundTruthBoxes:
    """GT boxes from a COCO instances JSON: crowd regions removed, corners rounded (LOST's `extract_gt_COCO`)."""
    data = load_coco_dataset(path)
    gt = GroundTruthBoxes(source=str(path), no_hard=no_hard, removed="crowd regions are not GT boxes",
                          images=data["images"])
    for img in data["images"]:
        gt.boxes[img["id"]] = []
        gt.sizes[img["id"]] = (img["height"], img["width"])
    for i, ann in enumerate(data["annotations"]):
        if ann.get("iscrowd", 0):
            continue
        if "bbox" not in ann:
            raise UserError(f"{path}: annotation #{i} has no 'bbox'")
        gt.boxes[ann["image_id"]].append(ann["bbox"])
    for key, boxes in gt.boxes.items():
        xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        corners = np.round(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))  # half to even
        gt.boxes[key] = np.concatenate([corners[:, :2], corners[:, 2:] - corners[:, :2]], axis=1)
    return gt


def gt_from_voc(voc_root: str | os.PathLike, image_set: str = "trainval", no_hard: bool = False) -> GroundTruthBoxes:
    """GT boxes from `Annotations/*.xml` of the images in `ImageSets/Main/<image_set>.txt`, keyed by
    image name; `no_hard` drops objects marked difficult or truncated (LOST's `--no_hard`)."""
    root = Path(voc_root)
    if not (root / "Annotations").is_dir():
        raise UserError(f"{root / 'Annotations'} not found; --voc_root must be a VOC20XX folder")
    gt = GroundTruthBoxes(source=str(root), no_hard=no_hard,
                          removed="objects marked difficult or truncated are not GT boxes" if no_hard else "")
    for name in read_image_set(root, "Main", image_set):
        ann = parse_voc_xml(root / "Annotations" / f"{name}.xml")
        boxes = [o.box_xyxy for o in ann.objects if not (no_hard and (o.difficult or o.truncated))]
        xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        gt.boxes[name] = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        gt.sizes[name] = (ann.height, ann.width)
    return gt


def prediction_box(ann: dict, size: tuple[int, int] | None) -> list[float]:
    """The prediction's `bbox`, or the tight box of its mask (checked by `utils.validate` beforehand)."""
    if "bbox" in ann:
        return list(ann["bbox"])
    segm = ann["segmentation"]
    if isinstance(segm, dict):
        size = tuple(segm["size"])
    rle = segmentation_to_rle(segm, *size)
    return mask_utils.toBbox(rle).tolist()


def most_confident_boxes(anns: list[dict], dataset: dict | None, pred_path: str | os.PathLike, gt: GroundTruthBoxes,
                         keyed_by_name: bool) -> dict:
    """The most confident prediction's box per GT image key, of predictions as `load_predictions` gives them;
    predictions on unknown images, and masks that do not fit their image, raise."""
    id_to_key: dict = {}
    if keyed_by_name:
        # VOC: image names; map prediction image ids through the prediction file's images (file_name)
        # if it has them, else through the YYYYNNNNNN convention of utils.voc.voc_image_id.
        if dataset is not None and dataset.get("images"):
            for img in dataset["images"]:
                if "file_name" in img:
                    id_to_key[img["id"]] = Path(img["file_name"]).stem
        for name in gt.boxes:
            try:
                id_to_key.setdefault(voc_image_id(name), name)
            except UserError:  # a name without an id (not YYYY_NNNNNN): matched by name only
                pass
            id_to_key.setdefault(name, name)
    keys = []
    for i, ann in enumerate(anns):
        key = id_to_key.get(ann["image_id"], ann["image_id"]) if keyed_by_name else ann["image_id"]
        if key not in gt.boxes:
            raise unknown_image_id(str(pred_path), i, ann["image_id"], f"the ground truth {gt.source}",
                                   keyed_by_name or names_all_images((dataset or {}).get("images")))
        height, width = gt.sizes.get(key, (0, 0))
        if "segmentation" in ann and height and width:
            check_mask_fits_image(ann["segmentation"], f"{pred_path}: annotation #{i} (image {key!r})",
                                  {"height": height, "width": width})
        elif "bbox" not in ann and isinstance(ann["segmentation"], list):
            raise UserError(f"{pred_path}: annotation #{i} has a polygon mask and no 'bbox', but the size of "
                            f"image {key!r} is unknown (its VOC XML has no <size>)")
        keys.append(key)
    best = most_confident(anns, keys)  # ties: the first in the file
    return {key: prediction_box(ann, gt.sizes.get(key)) for key, ann in best.items()}


def corloc_hit(box: list[float], gt_boxes: np.ndarray, iou_threshold: float = 0.5) -> bool:
    """LOST's CorLoc rule for one image: the predicted `[x, y, w, h]` box has IoU >= `iou_threshold` with at least
    one GT box (N x 4, xywh)."""
    return bool((box_iou_xywh(np.array([box]), gt_boxes)[0] >= iou_threshold).any())


def corloc(pred_boxes: dict, gt: GroundTruthBoxes, iou_threshold: float = 0.5, image_keys: list | None = None,
           matched_by: str = "image_id") -> CorLocResult:
    """CorLoc over the GT images (or those of `image_keys`), by LOST's protocol (see the module docstring)."""
    per_image, without_pred, without_gt, skipped = {}, 0, 0, 0
    keys = gt.boxes if image_keys is None else image_keys
    for key in keys:
        gt_boxes = gt.boxes[key]
        if len(gt_boxes) == 0:
            if gt.no_hard:
                skipped += 1
                continue
            without_gt += 1
            per_image[key] = False
            continue
        box = pred_boxes.get(key)
        if box is None:
            without_pred += 1
            per_image[key] = False
            continue
        per_image[key] = corloc_hit(box, gt_boxes, iou_threshold)
    if not per_image:
        raise UserError(f"no image of {gt.source} is left to count ({skipped} skipped without a GT box after "
                        f"--no_hard); CorLoc is undefined")
    correct = sum(per_image.values())
    return CorLocResult(corloc=100.0 * correct / len(per_image), num_correct=correct, num_images=len(per_image),
                        num_gt_images=len(gt.boxes), num_without_prediction=without_pred, num_without_gt=without_gt,
                        num_skipped=skipped, per_image=per_image, removed=gt.removed, matched_by=matched_by,
                        iou_threshold=iou_threshold)


def corloc_row(result: CorLocResult, label: str, against: str, stage: str) -> MetricRow:
    """"<label> CorLoc", measured against `against` (the GT boxes) with the protocol's details appended."""
    return MetricRow(stage, f"{label} CorLoc", result.corloc,
                     f"{against} (most confident mask per image, IoU >= {result.iou_threshold:g}, "
                     f"{result.num_images} images)")


def evaluate_corloc(pred_path: str | os.PathLike, gt_file: str | None = None, voc_root: str | None = None,
                    image_set: str = "trainval", no_hard: bool = False, iou_threshold: float = 0.5) -> CorLocResult:
    if (gt_file is None) == (voc_root is None):
        raise UserError("give exactly one of --gt_file (COCO JSON) and --voc_root (VOC XML)")
    if not 0.0 < iou_threshold <= 1.0:
        raise UserError(f"--iou_threshold {iou_threshold} is not in (0, 1]")
    gt = gt_from_coco(gt_file, no_hard) if gt_file else gt_from_voc(voc_root, image_set, no_hard)
    anns, dataset = load_predictions(pred_path)
    # A COCO GT and a predictions file that both name their images are matched by name, whatever their ids
    # (a GT numbering its images 1..N, masks numbered by file name), and only the predictions' images count.
    anns, image_keys = match_by_file_name(anns, dataset, gt.images, str(pred_path), str(gt_file)) if gt_file \
        else (anns, None)
    boxes = most_confident_boxes(anns, dataset, pred_path, gt, keyed_by_name=voc_root is not None)
    return corloc(boxes, gt, iou_threshold, image_keys, "image_id" if image_keys is None else "file_name")
