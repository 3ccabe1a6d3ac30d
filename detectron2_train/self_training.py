"""Self-training: a model's COCO results become the next round's pseudo-labels; the rounds themselves.

The paper's filtering step: for every image keep each prediction whose score is above the
threshold (score >= threshold); when none is, keep the single best one. Predictions with empty masks are dropped
first. Images without any prediction stay in the dataset as negatives.
CutLER's merge (`add_back_iou`): keep the predictions scoring at least the threshold (no best-one fallback),
and add back the previous pseudo-masks whose mask IoU with every kept prediction of their image is below
`add_back_iou` (0.5), so that an object the detector missed keeps its earlier mask.
`self_training_rounds` runs train -> predict -> filter -> retrain on the rounds of utils/rounds.py.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pycocotools import mask as mask_utils

from detectron2_train.engine import SCHEMA, run_inference, train
from evaluation.coco_eval import EvalOptions, evaluate_instances, format_report
from utils.coco_io import (annotations_by_image, check_image_ids, confident_else_best, load_coco_dataset,
                           load_predictions, segmentation_to_rle, write_json)
from utils.config import apply_overrides, nested, parse_override
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.rounds import Round, RoundSpec, run_rounds
from utils.training import HARMLESS_KEYS

SELF_TRAINING_KIND = "mask_rcnn_self_training_round"


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


@dataclass(frozen=True)
class RoundSettings:
    """What may change from one self-training round to the next (CutLER-style schedules).

    `score_thresh` turns the previous round's predictions into this round's pseudo-labels (unused in
    round 1, which trains on data.train_json); `overrides` are `--set`-style config overrides of this
    round only; `init_from_previous` starts from the previous round's weights instead of the backbone's;
    `add_back_iou` (CutLER: 0.5) adds back the previous round's pseudo-masks that overlap no kept
    prediction that much (`pseudo_label_dataset`); `config` is this round's whole config (e.g. CutLER's
    self-training config) instead of the shared one, before `overrides`.
    """
    score_thresh: float = 0.7
    overrides: tuple[str, ...] = ()
    init_from_previous: bool = False
    add_back_iou: float | None = None
    config: dict | None = None


def same_images(json_a: str | os.PathLike, json_b: str | os.PathLike) -> bool:
    """Whether two COCO files list the same images (ids and file names)."""
    def images(path: str | os.PathLike) -> list:
        return sorted((img["id"], img.get("file_name")) for img in load_coco_dataset(path)["images"])
    return Path(json_a).resolve() == Path(json_b).resolve() or images(json_a) == images(json_b)


def self_training_rounds(cfg: dict, info: DistInfo, rounds: Sequence[RoundSettings], init_weights: str | None = None,
                         evaluate: bool = True, iou_thresholds: Sequence[float] = (0.5, 0.7),
                         overwrite: bool = False) -> list[Round]:
    """Mask R-CNN in self-training rounds under cfg["output_dir"]/round<n>/ (utils/rounds.py).

    Round 1 trains on data.train_json; round n > 1 on round n-1's predictions on those images, filtered
    by its score threshold (`pseudo_label_dataset`; with `add_back_iou`, plus round n-1's own pseudo-masks
    that no kept prediction covers, as CutLER). Every round writes
      model_final.pth, train_results.json (predictions on data.train_json's images: the next round's seed,
      and the input of the segmentation stage), and, when data.test_json is set, its predictions
      (inference/results.json, or train_results.json when it lists the training images) and, with
      `evaluate`, eval.json (eval_instances.py's numbers: bbox and segm, mAP at `iou_thresholds`,
      class-agnostic when data.class_agnostic).
    Finished rounds are skipped; a round recorded with other settings is refused unless `overwrite`.
    """
    data = cfg["data"]
    for key in ("train_json", "train_root"):
        if not data.get(key):
            raise UserError(f"data.{key} is not set (use --{key} or --set data.{key}=...)")
    if data.get("test_json") and not data.get("test_root"):
        raise UserError("data.test_json is set but data.test_root is not")
    for number, settings in enumerate(rounds, start=1):
        for override in settings.overrides:  # checked as --set is: a typo or a bad value is refused here
            item = f"{number}:{override}"
            SCHEMA.check(nested(*parse_override(override, f"--round_set {item!r}")), f"--round_set {item}")
    for settings in rounds[1:]:
        if not 0.0 <= settings.score_thresh <= 1.0:
            raise UserError(f"--score_thresh must be in [0, 1], got {settings.score_thresh}")
        if settings.add_back_iou is not None and not 0.0 <= settings.add_back_iou <= 1.0:
            raise UserError(f"--add_back_iou must be in [0, 1], got {settings.add_back_iou}")
    round_configs = [{**apply_overrides(cfg if s.config is None else s.config, list(s.overrides)),
                      "output_dir": cfg["output_dir"]} for s in rounds]
    specs = []
    for number, (settings, round_cfg) in enumerate(zip(rounds, round_configs), start=1):
        chosen = {**round_cfg, "self_training": {
            "score_thresh": settings.score_thresh if number > 1 else None,
            "init": "previous round" if number > 1 and settings.init_from_previous else init_weights,
            "evaluate": evaluate, "iou_thresholds": list(iou_thresholds)}}
        if number > 1 and settings.add_back_iou is not None:  # recorded only when used: older rounds still match
            chosen["self_training"]["add_back_iou"] = settings.add_back_iou
        specs.append(RoundSpec(number, fingerprint(SELF_TRAINING_KIND, chosen, HARMLESS_KEYS)))

    def run_round(round: Round) -> dict:
        settings, round_cfg = rounds[round.number - 1], copy.deepcopy(round_configs[round.number - 1])
        round_cfg["output_dir"] = str(round.directory)
        weights = init_weights
        if round.previous is not None:
            pseudo_path = round.directory / "pseudo_labels.json"
            # the previous round's training set: data.train_json in round 1, its pseudo-labels later
            previous_json = (data["train_json"] if round.previous.previous is None
                             else round.previous.directory / "pseudo_labels.json")
            if info.is_main:
                dataset = write_pseudo_labels(round.previous.result["train_results"], data["train_json"],
                                              settings.score_thresh, pseudo_path, previous_json, settings.add_back_iou)
                print(f"round {round.number}: {len(dataset['annotations'])} pseudo-labels "
                      f"({dataset['info']['description']}) for {len(dataset['images'])} images in {pseudo_path}")
            barrier()
            round_cfg["data"]["train_json"] = str(pseudo_path)
            if settings.init_from_previous:
                weights = round.previous.result["checkpoint"]
        final = train(round_cfg, info, resume=True, init_weights=weights)
        train_results = round.directory / "train_results.json"
        run_inference(round_cfg, info, str(final), data["train_json"], data["train_root"], train_results)
        result = {"checkpoint": str(final), "train_results": str(train_results)}
        test_json = data.get("test_json")
        if not test_json:
            return result
        test_results = train_results
        if not same_images(test_json, data["train_json"]):
            test_results = round.directory / "inference" / "results.json"
            run_inference(round_cfg, info, str(final), test_json, data["test_root"], test_results)
        result["test_results"] = str(test_results)
        if evaluate and info.is_main:
            options = EvalOptions(iou_types=("bbox", "segm"), class_agnostic=bool(data["class_agnostic"]),
                                  iou_thresholds=tuple(iou_thresholds))
            report = evaluate_instances(test_results, test_json, options)
            write_json(round.directory / "eval.json", report.to_json(), indent=2)
            against = f"{test_results} against {report.reference}"
            metrics = report.metrics
            main_numbers = "; ".join(f"{t} AP {metrics[t]['AP'] or 0.0:.1f} AP50 {metrics[t]['AP50'] or 0.0:.1f}"
                                     for t in ("bbox", "segm"))
            print(f"round {round.number}: {against}\n{format_report(report)}\n"
                  f"round {round.number}: {main_numbers}: {against}")
            result["eval"] = str(round.directory / "eval.json")
        barrier()
        return result

    return run_rounds(cfg["output_dir"], specs, run_round, info, overwrite)
