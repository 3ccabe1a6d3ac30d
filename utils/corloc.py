"""CorLoc for single-object discovery (LOST, TokenCut, ...): the percentage of images whose most
confident predicted box has IoU >= 0.5 with at least one GT box.

- Only the most confident prediction of an image counts (ties: the first in the file).
- An image without any prediction is a miss.
- Images without any GT box (after `--no_hard`) are left out of the count, as in LOST.
Ground truth is a COCO JSON (bbox `[x, y, w, h]`) or VOC XML (boxes moved to pixel edges,
see `utils.voc.parse_voc_xml`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from utils.coco_io import box_iou_xywh, load_coco_dataset, load_predictions, segmentation_to_rle
from utils.errors import UserError
from utils.voc import parse_voc_xml, read_image_set, voc_image_id


@dataclass
class GroundTruthBoxes:
    """Per image: a name for messages and its GT boxes `[x, y, w, h]` (N, 4)."""

    boxes: dict = field(default_factory=dict)  # image key -> np.ndarray (N, 4)
    sizes: dict = field(default_factory=dict)  # image key -> (height, width)
    source: str = ""


@dataclass
class CorLocResult:
    corloc: float  # percent
    num_correct: int
    num_images: int
    num_without_prediction: int
    num_without_gt: int
    per_image: dict  # image key -> bool

    def to_json(self) -> dict:
        return {"CorLoc": self.corloc, "num_correct": self.num_correct, "num_images": self.num_images,
                "num_without_prediction": self.num_without_prediction, "num_without_gt": self.num_without_gt,
                "per_image": {str(k): v for k, v in self.per_image.items()}}


def gt_from_coco(path: str | os.PathLike, no_hard: bool = False) -> GroundTruthBoxes:
    """GT boxes from a COCO instances JSON; `no_hard` drops crowd regions."""
    data = load_coco_dataset(path)
    gt = GroundTruthBoxes(source=str(path))
    for img in data["images"]:
        gt.boxes[img["id"]] = []
        gt.sizes[img["id"]] = (img["height"], img["width"])
    for i, ann in enumerate(data["annotations"]):
        if no_hard and ann.get("iscrowd", 0):
            continue
        if "bbox" not in ann:
            raise UserError(f"{path}: annotation #{i} has no 'bbox'")
        gt.boxes[ann["image_id"]].append(ann["bbox"])
    gt.boxes = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in gt.boxes.items()}
    return gt


def gt_from_voc(voc_root: str | os.PathLike, image_set: str = "trainval", no_hard: bool = False) -> GroundTruthBoxes:
    """GT boxes from `Annotations/*.xml` of the images in `ImageSets/Main/<image_set>.txt`, keyed by
    image name; `no_hard` drops objects marked difficult or truncated (LOST's `--no_hard`)."""
    root = Path(voc_root)
    if not (root / "Annotations").is_dir():
        raise UserError(f"{root / 'Annotations'} not found; --voc_root must be a VOC20XX folder")
    gt = GroundTruthBoxes(source=str(root))
    for name in read_image_set(root, "Main", image_set):
        ann = parse_voc_xml(root / "Annotations" / f"{name}.xml")
        boxes = [o.box_xyxy for o in ann.objects if not (no_hard and (o.difficult or o.truncated))]
        xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        gt.boxes[name] = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        gt.sizes[name] = (ann.height, ann.width)
    return gt


def prediction_box(ann: dict, size: tuple[int, int] | None) -> list[float]:
    """The prediction's `bbox`, or the tight box of its mask."""
    if "bbox" in ann:
        return list(ann["bbox"])
    if size is None or not all(size):
        size = tuple(ann["segmentation"].get("size", (0, 0))) if isinstance(ann["segmentation"], dict) else (0, 0)
    rle = segmentation_to_rle(ann["segmentation"], *size)
    return mask_utils.toBbox(rle).tolist()


def most_confident_boxes(pred_path: str | os.PathLike, gt: GroundTruthBoxes, keyed_by_name: bool) -> dict:
    """The most confident prediction's box per GT image key; predictions on unknown images raise."""
    anns, dataset = load_predictions(pred_path)
    id_to_key: dict = {}
    if keyed_by_name:
        # VOC: image names; map prediction image ids through the prediction file's images (file_name)
        # if it has them, else through the YYYYNNNNNN convention of utils.voc.voc_image_id.
        if dataset is not None and dataset.get("images"):
            for img in dataset["images"]:
                if "file_name" in img:
                    id_to_key[img["id"]] = Path(img["file_name"]).stem
        for name in gt.boxes:
            id_to_key.setdefault(voc_image_id(name), name)
            id_to_key.setdefault(name, name)
    best: dict = {}
    for i, ann in enumerate(anns):
        key = id_to_key.get(ann["image_id"], ann["image_id"]) if keyed_by_name else ann["image_id"]
        if key not in gt.boxes:
            raise UserError(f"{pred_path}: annotation #{i} has image_id {ann['image_id']!r} which is not in the "
                            f"ground truth {gt.source}")
        if key not in best or ann["score"] > best[key]["score"]:
            best[key] = ann
    boxes = {}
    for key, ann in best.items():
        try:
            boxes[key] = prediction_box(ann, gt.sizes.get(key))
        except Exception as exc:
            raise UserError(f"{pred_path}: cannot read the mask of the prediction for image {key!r} ({exc})") from None
    return boxes


def corloc(pred_boxes: dict, gt: GroundTruthBoxes, iou_threshold: float = 0.5) -> CorLocResult:
    """CorLoc over the GT images that have at least one box."""
    per_image, without_pred, without_gt = {}, 0, 0
    for key, gt_boxes in gt.boxes.items():
        if len(gt_boxes) == 0:
            without_gt += 1
            continue
        box = pred_boxes.get(key)
        if box is None:
            without_pred += 1
            per_image[key] = False
            continue
        per_image[key] = bool((box_iou_xywh(np.array([box]), gt_boxes)[0] >= iou_threshold).any())
    if not per_image:
        raise UserError(f"no image of {gt.source} has a GT box; CorLoc is undefined")
    correct = sum(per_image.values())
    return CorLocResult(corloc=100.0 * correct / len(per_image), num_correct=correct, num_images=len(per_image),
                        num_without_prediction=without_pred, num_without_gt=without_gt, per_image=per_image)


def evaluate_corloc(pred_path: str | os.PathLike, gt_file: str | None = None, voc_root: str | None = None,
                    image_set: str = "trainval", no_hard: bool = False, iou_threshold: float = 0.5) -> CorLocResult:
    if (gt_file is None) == (voc_root is None):
        raise UserError("give exactly one of --gt_file (COCO JSON) and --voc_root (VOC XML)")
    if not 0.0 < iou_threshold <= 1.0:
        raise UserError(f"--iou_threshold {iou_threshold} is not in (0, 1]")
    gt = gt_from_coco(gt_file, no_hard) if gt_file else gt_from_voc(voc_root, image_set, no_hard)
    boxes = most_confident_boxes(pred_path, gt, keyed_by_name=voc_root is not None)
    return corloc(boxes, gt, iou_threshold)
