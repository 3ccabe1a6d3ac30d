"""GGN's training set: the annotations of the seen classes plus the best pseudo-masks that cover
something else (Wang et al., CVPR 2022).

Per image, a pseudo-mask (gen_pa_masks.py output, or any COCO results with scores) is a candidate
only when its mask IoU with every annotated object of the image is below 0.5 (pycocotools'
`iou` on RLEs; a crowd region counts by the share of the pseudo-mask it covers, as pycocotools
scores crowds); of the candidates, the `topk` best by score are kept. This is the order of GGN's
release (its dataset drops pseudo-masks by their recorded GT IoU, then takes the first k). The
kept pseudo-masks join the annotations in one class-agnostic training set: every annotation
gets the one `object` category, pseudo-masks keep their score and carry `"pseudo": 1`.

train_net.py --pseudo_json P.json [--pseudo_topk K] [--seen_classes A.txt] writes that set to
OUTPUT_DIR/training_set.json and trains on it (`training_json`).
"""
from __future__ import annotations

import os
from pathlib import Path

from pycocotools import mask as mask_utils

from detectron2_train.splits import read_class_list
from utils.coco_io import (OBJECT_CATEGORY, annotations_by_image, check_image_ids, load_coco_dataset,
                           load_predictions, segmentation_to_rle, write_json)
from utils.distributed import DistInfo, barrier
from utils.errors import UserError

IOU_THRESH = 0.5  # GGN: a pseudo-mask overlapping an annotated object this much duplicates it
TRAINING_SET = "training_set.json"


def select_pseudo_masks(pseudo: list[dict], annotated: list[dict], height: int, width: int, topk: int,
                        iou_thresh: float = IOU_THRESH) -> list[dict]:
    """One image's kept pseudo-masks, best score first: IoU < `iou_thresh` with every annotated object,
    then the first `topk`. Equal scores keep the input order."""
    ranked = sorted(pseudo, key=lambda a: -float(a.get("score", 1.0)))
    if annotated and ranked:
        ious = mask_utils.iou([segmentation_to_rle(a["segmentation"], height, width) for a in ranked],
                              [segmentation_to_rle(a["segmentation"], height, width) for a in annotated],
                              [int(bool(a.get("iscrowd", 0))) for a in annotated])
        ranked = [a for a, row in zip(ranked, ious) if row.max() < iou_thresh]
    return ranked[:topk]


def merge_pseudo_gt(dataset: dict, pseudo: list[dict], topk: int, seen_category_ids: list[int] | None = None,
                    iou_thresh: float = IOU_THRESH) -> dict:
    """The class-agnostic training set: `dataset`'s images, its annotations (of `seen_category_ids` only,
    when given) and each image's kept pseudo-masks (`select_pseudo_masks`), all in the `object` category."""
    seen = None if seen_category_ids is None else set(seen_category_ids)
    annotations = [{**a, "category_id": OBJECT_CATEGORY["id"]} for a in dataset["annotations"]
                   if seen is None or a.get("category_id") in seen]
    by_image = annotations_by_image(annotations)
    pseudo_by_image = annotations_by_image(pseudo)
    next_id = max((int(a["id"]) for a in dataset["annotations"]), default=0) + 1
    added = []
    for image in dataset["images"]:
        kept = select_pseudo_masks(pseudo_by_image.get(image["id"], []), by_image.get(image["id"], []),
                                   image["height"], image["width"], topk, iou_thresh)
        for ann in kept:
            added.append({"id": next_id, "image_id": image["id"], "category_id": OBJECT_CATEGORY["id"],
                          "segmentation": ann["segmentation"], "bbox": ann["bbox"], "area": ann["area"],
                          "score": float(ann.get("score", 1.0)), "iscrowd": 0, "pseudo": 1})
            next_id += 1
    return {"info": {"description": f"annotations + top-{topk} pseudo-masks per image with IoU < {iou_thresh} "
                                    f"to every annotated object (GGN)",
                     "annotated": len(annotations), "pseudo_masks": len(added)},
            "images": dataset["images"], "annotations": annotations + added, "categories": [OBJECT_CATEGORY]}


def pseudo_annotations(path: str | os.PathLike, dataset: dict, dataset_name: str) -> list[dict]:
    """The pseudo-masks of `path` (a COCO dataset or results list), each with a mask, an area and a box,
    on images of `dataset`."""
    pseudo, _ = load_predictions(path)
    check_image_ids(pseudo, dataset, str(path), dataset_name)
    images = {img["id"]: img for img in dataset["images"]}
    out = []
    for i, ann in enumerate(pseudo):
        if "segmentation" not in ann:
            raise UserError(f"{path}: annotation #{i} has no 'segmentation'; pseudo ground truth needs masks")
        image = images[ann["image_id"]]
        rle = segmentation_to_rle(ann["segmentation"], image["height"], image["width"])
        area = float(mask_utils.area(rle))
        if area == 0:
            continue
        out.append({**ann, "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
    return out


def training_json(cfg: dict, info: DistInfo) -> str:
    """The COCO JSON Mask R-CNN trains on: data.train_json itself, or, with data.pseudo_json or
    data.seen_classes, the merged set written (atomically, by rank 0) to OUTPUT_DIR/training_set.json."""
    data_cfg = cfg["data"]
    pseudo_json, seen_classes = data_cfg.get("pseudo_json"), data_cfg.get("seen_classes")
    if not pseudo_json and not seen_classes:
        return data_cfg["train_json"]
    if not data_cfg["class_agnostic"]:
        raise UserError("data.pseudo_json and data.seen_classes make a class-agnostic training set: "
                        "set data.class_agnostic (--class_agnostic)")
    path = Path(cfg["output_dir"]) / TRAINING_SET
    if info.is_main:
        dataset = load_coco_dataset(data_cfg["train_json"])
        seen = read_class_list(seen_classes, dataset["categories"]) if seen_classes else None
        pseudo = pseudo_annotations(pseudo_json, dataset, data_cfg["train_json"]) if pseudo_json else []
        merged = merge_pseudo_gt(dataset, pseudo, int(data_cfg["pseudo_topk"]), seen)
        write_json(path, merged)
        print(f"training set: {merged['info']['annotated']} annotated objects"
              + (f" + {merged['info']['pseudo_masks']} pseudo-masks" if pseudo_json else "") + f" -> {path}")
    barrier()
    return str(path)
