"""Self-training's pseudo-labels: a model's COCO results become the next round's training set.

The paper's filtering step: for every image keep each prediction whose score is above the
threshold (score >= threshold); when none is, keep the single best one. Predictions with empty masks are dropped
first. Images without any prediction stay in the dataset as negatives.
CutLER's merge (`add_back_iou`): keep the predictions scoring at least the threshold (no best-one fallback),
and add back the previous pseudo-masks whose mask IoU with every kept prediction of their image is below
`add_back_iou` (0.5), so that an object the detector missed keeps its earlier mask.
Used by `train_net.py --pseudo_from` (detectron2_train.engine.run) and by every self-training round
(detectron2_train.self_training).
"""
from __future__ import annotations

import os

from pycocotools import mask as mask_utils

from utils.coco_io import (annotations_by_image, check_image_ids, confident_else_best, load_coco_dataset,
                           load_predictions, segmentation_to_rle, write_json)
from utils.errors import UserError


def filter_predictions(predictions: list[dict], score_thresh: float) -> list[dict]:
    """Per image, best first: every prediction with score >= score_thresh, or the best one when none passes."""
    kept = []
    for _, preds in sorted(annotations_by_image(predictions).items(), key=lambda kv: str(kv[0])):
        preds = sorted(preds, key=lambda p: -float(p.get("score", 1.0)))
        kept.extend(confident_else_best(preds, score_thresh)[0])
    return kept


def add_back_previous(kept: list[dict], previous: list[dict], iou_thresh: float) -> list[dict]:
    """CutLER's add-back for one image: the `previous` pseudo-masks whose mask IoU with every `kept` prediction
    is below `iou_thresh` (all of them when nothing is kept). Segmentations are RLE of the same image."""
    if not kept or not previous:
        return list(previous)
    ious = mask_utils.iou([p["segmentation"] for p in previous], [k["segmentation"] for k in kept], [0] * len(kept))
    return [p for p, row in zip(previous, ious) if float(row.max()) < iou_thresh]


def _with_rle_box_area(ann: dict, image: dict) -> dict | None:
    """The annotation with an RLE mask (`counts` as str), the mask's box and area; None when the mask is empty."""
    rle = segmentation_to_rle(ann["segmentation"], image["height"], image["width"])
    area = float(mask_utils.area(rle))
    if area == 0:
        return None
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    counts = rle["counts"].decode("utf-8") if isinstance(rle["counts"], bytes) else rle["counts"]
    return {**ann, "segmentation": {"size": list(rle["size"]), "counts": counts}, "bbox": bbox, "area": area}


def _usable_masks(anns: list[dict], images: dict, category_ids: set, path: str | os.PathLike,
                  images_json: str | os.PathLike, what: str) -> list[dict]:
    """The non-empty masks of `anns` as RLE with their boxes; one error line for a missing mask or category."""
    usable = []
    for i, ann in enumerate(anns):
        if "segmentation" not in ann:
            raise UserError(f"{path}: {what} #{i} has no 'segmentation'; pseudo-labels need masks")
        if category_ids and ann.get("category_id") not in category_ids:
            raise UserError(f"{path}: {what} #{i} has category_id {ann.get('category_id')} "
                            f"which is not in {images_json}")
        normalised = _with_rle_box_area(ann, images[ann["image_id"]])
        if normalised is not None:
            usable.append(normalised)
    return usable


def pseudo_label_dataset(results_path: str | os.PathLike, images_json: str | os.PathLike,
                         score_thresh: float, previous_json: str | os.PathLike | None = None,
                         add_back_iou: float | None = None) -> dict:
    """A COCO dataset with the images (and categories) of `images_json` and the kept predictions.

    Without `add_back_iou`: per image, the predictions scoring at least `score_thresh`, or the best one.
    With it (CutLER): the predictions scoring at least `score_thresh`, then the pseudo-masks of
    `previous_json` (the previous round's training set, on the same images) whose mask IoU with every
    kept prediction of their image is below `add_back_iou`. Annotations are numbered 1..N, image by image.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise UserError(f"--score_thresh must be in [0, 1], got {score_thresh}")
    if add_back_iou is not None and (previous_json is None or not 0.0 <= add_back_iou <= 1.0):
        raise UserError(f"--add_back_iou must be in [0, 1] and needs the previous pseudo-masks, got {add_back_iou}")
    source = load_coco_dataset(images_json)
    predictions, _ = load_predictions(results_path)
    check_image_ids(predictions, source, str(results_path), str(images_json))
    images = {img["id"]: img for img in source["images"]}
    category_ids = {c["id"] for c in source["categories"]}
    usable = _usable_masks(predictions, images, category_ids, results_path, images_json, "prediction")
    if add_back_iou is None:
        kept = filter_predictions(usable, score_thresh)
        rule = f"score >= {score_thresh}, else the best prediction per image"
    else:
        previous = load_coco_dataset(previous_json)
        check_image_ids(previous["annotations"], source, str(previous_json), str(images_json))
        earlier = annotations_by_image(_usable_masks([a for a in previous["annotations"] if not a.get("iscrowd")],
                                                     images, category_ids, previous_json, images_json, "annotation"))
        confident = annotations_by_image([p for p in usable if float(p.get("score", 1.0)) >= score_thresh])
        kept = []
        for image_id in images:
            preds = sorted(confident.get(image_id, []), key=lambda p: -float(p.get("score", 1.0)))
            kept += preds + add_back_previous(preds, earlier.get(image_id, []), add_back_iou)
        rule = (f"score >= {score_thresh}, plus the masks of {os.fspath(previous_json)} with IoU < {add_back_iou} "
                f"with every kept prediction")
    annotations = []
    for ann_id, pred in enumerate(kept, start=1):
        annotations.append({"id": ann_id, "image_id": pred["image_id"], "category_id": pred.get("category_id", 1),
                            "segmentation": pred["segmentation"], "bbox": pred["bbox"], "area": pred["area"],
                            "score": float(pred.get("score", 1.0)), "iscrowd": 0})
    categories = source["categories"] or [{"id": c, "name": f"class_{c}"}
                                          for c in sorted({a["category_id"] for a in annotations}) or [1]]
    return {"images": source["images"], "annotations": annotations, "categories": categories,
            "info": {"description": f"pseudo-labels from {os.fspath(results_path)} ({rule})"}}


def write_pseudo_labels(results_path: str | os.PathLike, images_json: str | os.PathLike,
                        score_thresh: float, out_path: str | os.PathLike,
                        previous_json: str | os.PathLike | None = None, add_back_iou: float | None = None) -> dict:
    dataset = pseudo_label_dataset(results_path, images_json, score_thresh, previous_json, add_back_iou)
    write_json(out_path, dataset)
    return dataset
