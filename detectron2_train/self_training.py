"""Self-training: turn a model's COCO results into the next round's pseudo-label dataset.

The paper's filtering step: for every image keep each prediction whose score is above the
threshold (score >= threshold); when none is, keep the single best one. Predictions with empty masks are dropped
first. Images without any prediction stay in the dataset as negatives.
"""
from __future__ import annotations

import os

from utils.coco_io import (annotations_by_image, check_image_ids, confident_else_best, decode_segmentation,
                           load_coco_dataset, load_predictions, mask_to_bbox, mask_to_rle, write_json)
from utils.errors import UserError


def filter_predictions(predictions: list[dict], score_thresh: float) -> list[dict]:
    """Per image, best first: every prediction with score >= score_thresh, or the best one when none passes."""
    kept = []
    for _, preds in sorted(annotations_by_image(predictions).items(), key=lambda kv: str(kv[0])):
        preds = sorted(preds, key=lambda p: -float(p.get("score", 1.0)))
        kept.extend(confident_else_best(preds, score_thresh)[0])
    return kept


def pseudo_label_dataset(results_path: str | os.PathLike, images_json: str | os.PathLike,
                         score_thresh: float) -> dict:
    """A COCO dataset with the images (and categories) of `images_json` and the kept predictions."""
    if not 0.0 <= score_thresh <= 1.0:
        raise UserError(f"--score_thresh must be in [0, 1], got {score_thresh}")
    source = load_coco_dataset(images_json)
    predictions, _ = load_predictions(results_path)
    check_image_ids(predictions, source, str(results_path), str(images_json))
    images = {img["id"]: img for img in source["images"]}
    category_ids = {c["id"] for c in source["categories"]}
    usable = []
    for i, pred in enumerate(predictions):
        if "segmentation" not in pred:
            raise UserError(f"{results_path}: prediction #{i} has no 'segmentation'; pseudo-labels need masks")
        if category_ids and pred.get("category_id") not in category_ids:
            raise UserError(f"{results_path}: prediction #{i} has category_id {pred.get('category_id')} "
                            f"which is not in {images_json}")
        img = images[pred["image_id"]]
        mask = decode_segmentation(pred["segmentation"], img["height"], img["width"])
        area = int(mask.sum())
        if area == 0:
            continue
        usable.append({**pred, "segmentation": mask_to_rle(mask), "bbox": mask_to_bbox(mask), "area": float(area)})
    annotations = []
    for ann_id, pred in enumerate(filter_predictions(usable, score_thresh), start=1):
        annotations.append({"id": ann_id, "image_id": pred["image_id"], "category_id": pred.get("category_id", 1),
                            "segmentation": pred["segmentation"], "bbox": pred["bbox"], "area": pred["area"],
                            "score": float(pred.get("score", 1.0)), "iscrowd": 0})
    categories = source["categories"] or [{"id": c, "name": f"class_{c}"}
                                          for c in sorted({a["category_id"] for a in annotations}) or [1]]
    return {"images": source["images"], "annotations": annotations, "categories": categories,
            "info": {"description": f"pseudo-labels from {os.fspath(results_path)} (score >= {score_thresh}, "
                                    f"else the best prediction per image)"}}


def write_pseudo_labels(results_path: str | os.PathLike, images_json: str | os.PathLike,
                        score_thresh: float, out_path: str | os.PathLike) -> dict:
    dataset = pseudo_label_dataset(results_path, images_json, score_thresh)
    write_json(out_path, dataset)
    return dataset
