"""Instance evaluation through pycocotools: mask/box AP, the most-confident protocol, class-agnostic
folding, mAP^r at chosen IoU thresholds, class-agnostic AR@1/10/100, category subsets, and the
open-world AR@k of GGN (cross-category generalisation: recall of unseen classes).

Every number comes from pycocotools' own `COCOeval`; this module only prepares its inputs:
- For mask AP the predictions' `bbox` is dropped before `loadRes`, as detectron2 does, so that
  the small/medium/large split uses the mask area (with a bbox, pycocotools uses the box area).
- For box AP the `segmentation` is dropped, so boxes are read as boxes (a missing `bbox` is the
  mask's tight box).
- Polygons and uncompressed RLE in predictions become compressed RLE (pycocotools' `loadRes`
  accepts only compressed RLE for masks).
- The open-world AR (`max_dets`) folds all categories into one and evaluates the recall of the GT
  objects of `eval_classes` only. As in GGN's evaluation (OLN's `COCOEvalXclassWrapper`), GT
  objects of the other classes are ignored, and a detection matched to one of them is dropped
  from its image's ranked list: it neither counts as a hit nor takes one of the k places of
  AR@k. (GGN's code ranks its largest k before dropping; here every k drops them.)
All inputs are checked before anything is evaluated, so a malformed file never yields a number.
"""
from __future__ import annotations

import sys

import contextlib
import copy
import functools
import io
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.coco_io import (OBJECT_CATEGORY, box_iou_xywh, check_image_ids, load_coco_dataset, load_predictions,
                           match_by_file_name, names_all_images, reference_name, segmentation_to_rle)
from evaluation.most_confident import most_confident
from evaluation.rows import MetricRow
from utils.errors import UserError
from utils.validate import require_gt_fields

# pycocotools' `stats` order for bbox/segm.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("segm", "bbox")


@dataclass
class EvalOptions:
    iou_types: tuple[str, ...] = ("segm",)
    most_confident: bool = False
    class_agnostic: bool = False
    iou_thresholds: tuple[float, ...] = ()
    eval_classes: tuple[str, ...] = ()  # category ids or names
    max_dets: tuple[int, ...] = ()  # open-world AR@k for these k (none: not computed)


@dataclass
class EvalResult:
    """All numbers in percent (pycocotools' fractions x 100); None where pycocotools gives -1 (undefined)."""

    options: dict
    num_images: int
    num_predictions: int
    num_gt: int
    eval_category_ids: list[int]
    metrics: dict = field(default_factory=dict)  # iou_type -> {name: value}
    summaries: dict = field(default_factory=dict)  # iou_type -> pycocotools' printed table
    notes: list[str] = field(default_factory=list)
    reference: str = ""  # what the predictions were compared with (utils.coco_io.reference_name), when known

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- pycocotools glue


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools COCO object from an in-memory dict (no temporary file, no index chatter)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_results(gt: COCO, predictions: list[dict]) -> COCO:
    """`gt.loadRes(predictions)`, also for an empty list (which pycocotools cannot load)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if predictions:
            return gt.loadRes(copy.deepcopy(predictions))
        return coco_from_dict({"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []})


def run_cocoeval(gt: COCO, predictions: list[dict], iou_type: str, cat_ids: list[int] | None = None,
                 iou_thrs: Iterable[float] | None = None, max_dets: list[int] | None = None,
                 evaluator_class: type[COCOeval] = COCOeval) -> tuple[COCOeval, str]:
    """Evaluate, accumulate and (with the default `max_dets`) summarize; returns the evaluator and
    pycocotools' printed table ("" when not summarized: its table assumes maxDets 1/10/100)."""
    dt = load_results(gt, predictions)
    evaluator = evaluator_class(gt, dt, iou_type)
    if cat_ids is not None:
        evaluator.params.catIds = sorted(cat_ids)
    if iou_thrs is not None:
        evaluator.params.iouThrs = np.asarray(sorted(iou_thrs), dtype=np.float64)
    if max_dets is not None:
        evaluator.params.maxDets = list(max_dets)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.evaluate()
        evaluator.accumulate()
    if max_dets is not None:
        return evaluator, ""
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    return evaluator, table.getvalue()


class OpenWorldCOCOeval(COCOeval):
    """COCOeval with GGN's cross-category protocol: the GT objects whose ids are in `ignored_ids`
    are ignored (like crowd regions, but matched once), and a detection matched to one of them at
    the lowest IoU threshold is removed from the image's results before `accumulate` ranks them,
    so it takes none of the k places of AR@k."""

    def __init__(self, gt: COCO, dt: COCO, iou_type: str, ignored_ids: frozenset = frozenset()):
        super().__init__(gt, dt, iou_type)
        self.ignored_ids = ignored_ids

    def _prepare(self) -> None:
        super()._prepare()
        for objects in self._gts.values():
            for obj in objects:
                if obj["id"] in self.ignored_ids:
                    obj["ignore"] = 1

    def evaluateImg(self, imgId: int, catId: int, aRng: list, maxDet: int) -> dict | None:  # noqa: N802, N803
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is None or not self.ignored_ids or not len(result["dtIds"]):
            return result
        keep = ~np.isin(result["dtMatches"][0], list(self.ignored_ids))  # row 0: the lowest IoU threshold
        if not keep.all():
            result["dtIds"] = [d for d, k in zip(result["dtIds"], keep) if k]
            result["dtScores"] = [s for s, k in zip(result["dtScores"], keep) if k]
            result["dtMatches"] = result["dtMatches"][:, keep]
            result["dtIgnore"] = result["dtIgnore"][:, keep]
        return result


def open_world_recall(predictions: list[dict], gt_dataset: dict, eval_ids: list[int] | None, iou_type: str,
                      max_dets: Iterable[int]) -> dict[str, float | None]:
    """Class-agnostic AR@k (IoU 0.50:0.95, percent) of the GT objects of `eval_ids` (all when None),
    with GGN's protocol for the objects of other categories; also AR_s/m/l at the largest k.

    `predictions` hold the fields for `iou_type` (see `for_iou_type`). Every detection of an image
    is matched (not only its best max(k)), so that a dropped detection frees its place for all k."""
    anns = [dict(a) for a in gt_dataset["annotations"]]
    ignored = frozenset(a["id"] for a in anns if eval_ids is not None and a["category_id"] not in eval_ids)
    gt = coco_from_dict({"images": gt_dataset["images"], "annotations": fold_categories(anns),
                         "categories": [dict(OBJECT_CATEGORY)]})
    ks = sorted(set(int(k) for k in max_dets))
    per_image = max(np.unique([p["image_id"] for p in predictions], return_counts=True)[1], default=0)
    all_dets = ks + ([int(per_image)] if per_image > ks[-1] else [])
    evaluator = run_cocoeval(gt, fold_categories(predictions), iou_type, max_dets=all_dets,
                             evaluator_class=functools.partial(OpenWorldCOCOeval, ignored_ids=ignored))[0]
    recall = evaluator.eval["recall"]  # [IoU threshold, category, area range, max dets]
    areas = evaluator.params.areaRngLbl

    def mean_recall(area: str, k: int) -> float | None:
        values = recall[:, 0, areas.index(area), all_dets.index(k)]
        values = values[values > -1]
        return _percent(float(np.mean(values))) if values.size else None

    out = {f"AR@{k}": mean_recall("all", k) for k in ks}
    for label, area in (("ARs", "small"), ("ARm", "medium"), ("ARl", "large")):
        out[f"{label}@{ks[-1]}"] = mean_recall(area, ks[-1])
    return out


def ap_at_iou(evaluator: COCOeval, iou: float) -> float:
    """Mean precision at one IoU threshold, area 'all', maxDets 100: pycocotools' `_summarize(1, iouThr=iou)`."""
    params = evaluator.params
    t = np.flatnonzero(np.isclose(params.iouThrs, iou))
    if t.size == 0:
        raise ValueError(f"IoU {iou} was not evaluated")
    area = params.areaRngLbl.index("all")
    maxdet = params.maxDets.index(100)
    precision = evaluator.eval["precision"][t[0], :, :, area, maxdet]
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _percent(value: float) -> float | None:
    return None if value < 0 else float(value) * 100.0


# ----------------------------------------------------------------------------- input preparation


def resolve_categories(gt: dict, requested: Iterable[str]) -> list[int]:
    """Category ids from ids or names (`--eval_classes 1 3 person`)."""
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    known_ids = {c["id"] for c in gt["categories"]}
    ids = []
    for item in requested:
        item = str(item)
        if item in by_name:
            ids.append(by_name[item])
        elif item.lstrip("-").isdigit() and int(item) in known_ids:
            ids.append(int(item))
        else:
            raise UserError(f"--eval_classes: {item!r} is neither a category id nor a category name of the GT "
                            f"(names: {', '.join(sorted(by_name)[:8])}{'...' if len(by_name) > 8 else ''})")
    return sorted(set(ids))


def fold_categories(dataset_anns: list[dict]) -> list[dict]:
    out = []
    for ann in dataset_anns:
        ann = dict(ann)
        ann["category_id"] = OBJECT_CATEGORY["id"]
        out.append(ann)
    return out


def normalise_predictions(anns: list[dict], images: dict[int, dict], source: str, need_category: bool) -> list[dict]:
    """Store every prediction's mask as compressed RLE with str counts (pycocotools' `loadRes` takes no
    other mask format). The entries were checked when loaded (`load_predictions`: finite scores and boxes,
    well-formed masks) and against their images (`check_image_ids`: RLE sizes, polygon extents)."""
    out = []
    for i, ann in enumerate(anns):
        if need_category and "category_id" not in ann:
            raise UserError(f"{source}: annotation #{i} has no 'category_id' (pass --class_agnostic to ignore "
                            f"categories)")
        ann = dict(ann)
        if "segmentation" in ann:
            img = images[ann["image_id"]]
            rle = segmentation_to_rle(ann["segmentation"], img["height"], img["width"])
            rle = {"size": list(rle["size"]), "counts": rle["counts"]}
            if isinstance(rle["counts"], bytes):
                rle["counts"] = rle["counts"].decode("utf-8")
            ann["segmentation"] = rle
            ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
        out.append(ann)
    return out


def check_category_ids(anns: list[dict], known_ids: Iterable, source: str, what: str, remedy: str) -> None:
    """pycocotools evaluates the categories of the GT's `categories` only and silently drops every object of
    another id: a UserError naming the unknown ids (with their counts) instead."""
    known = set(known_ids)
    unknown = Counter(a.get("category_id") for a in anns if a.get("category_id") not in known)
    if unknown:
        listed = ", ".join(f"{cid!r} ({n}x)" for cid, n in sorted(unknown.items(), key=lambda kv: str(kv[0]))[:8])
        more = ", ..." if len(unknown) > 8 else ""
        raise UserError(f"{source}: {sum(unknown.values())} of {len(anns)} {what} have category ids that are not "
                        f"among the GT categories ({_id_list(known)}): {listed}{more}; pycocotools would silently "
                        f"ignore them; {remedy}")


def check_category_names(pred_categories: list[dict], gt_categories: list[dict], pred_source: str,
                         gt_source: str) -> None:
    """A class-aware score compares category ids: predictions whose own `categories` give an id another name
    than the GT does (gen_masks.py's single class 'object' is id 1, COCO's 'person') would be scored as the GT's
    class; a UserError naming the first such id instead."""
    gt_names = {c["id"]: c.get("name") for c in gt_categories}
    for category in pred_categories:
        gt_name = gt_names.get(category.get("id"))
        if gt_name is not None and category.get("name") is not None and category["name"] != gt_name:
            raise UserError(f"{pred_source}: category {category['id']} is {category['name']!r} there but "
                            f"{gt_name!r} in {gt_source}: a class-aware score would count its masks as {gt_name!r}; "
                            f"pass --class_agnostic, or label the masks with the GT's classes (utils/cluster.py "
                            f"--gt_file)")


def check_gt_masks_not_empty(annotations: list[dict], images: dict[int, dict], gt_source: str) -> None:
    """Mask AP against a GT whose objects have no mask (a box-only GT: every non-crowd mask empty) would score
    0.00 without a word: a UserError instead. A few empty masks among real ones (a degenerate annotation, as in
    Oxford-IIIT Pet) are scored as COCO scores them, as misses, with a warning naming them."""
    empty = []
    counted = 0
    for i, ann in enumerate(annotations):
        if ann.get("iscrowd", 0):
            continue
        counted += 1
        image = images[ann["image_id"]]
        if mask_utils.area(segmentation_to_rle(ann["segmentation"], image["height"], image["width"])) == 0:
            empty.append((i, ann["image_id"]))
    if not empty:
        return
    first = f"annotation #{empty[0][0]} (image_id {empty[0][1]!r})"
    if len(empty) == counted:
        raise UserError(f"{gt_source}: every ground-truth object has an empty mask (e.g. {first}); mask AP needs "
                        f"masks (use --iou_type bbox, or fix the GT)")
    print(f"warning: {gt_source}: {len(empty)} of {counted} ground-truth objects have an empty mask (e.g. {first}); "
          f"mask AP counts them as misses", file=sys.stderr)


def _id_list(ids: set) -> str:
    shown = sorted(ids, key=str)
    return ", ".join(str(i) for i in shown[:10]) + (", ..." if len(shown) > 10 else "")


def for_iou_type(predictions: list[dict], iou_type: str, source: str) -> list[dict]:
    """The fields pycocotools should see for one IoU type (see module docstring)."""
    out = []
    for i, ann in enumerate(predictions):
        ann = dict(ann)
        if iou_type == "segm":
            if "segmentation" not in ann:
                raise UserError(f"{source}: annotation #{i} has no 'segmentation'; use --iou_type bbox for boxes")
            ann.pop("bbox", None)
        else:
            ann.pop("segmentation", None)
        for key in ("id", "area", "iscrowd"):
            ann.pop(key, None)
        out.append(ann)
    return out


def select_most_confident(predictions: list[dict], gt: dict) -> tuple[list[dict], dict, int]:
    """The single-object protocol: the most confident prediction of each image, and the GT object
    whose box has the highest IoU with it (crowd regions are not candidates).

    Returns (selected predictions, GT dict holding only the paired objects, number of selected
    predictions on images without any non-crowd GT object; those stay as false positives).
    Images without a prediction contribute no GT object, as in the MaskDistill evaluation.
    """
    best = most_confident(predictions)  # ties: the first in the file
    gt_by_image: dict = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            gt_by_image.setdefault(ann["image_id"], []).append(ann)
    paired, unpaired = [], 0
    for image_id, pred in best.items():
        candidates = gt_by_image.get(image_id, [])
        if not candidates:
            unpaired += 1
            continue
        ious = box_iou_xywh(np.array([pred["bbox"]]), np.array([c["bbox"] for c in candidates]))[0]
        paired.append(candidates[int(np.argmax(ious))])
    selected_gt = dict(gt)
    selected_gt["annotations"] = paired
    return list(best.values()), selected_gt, unpaired


# ----------------------------------------------------------------------------- the evaluation


def check_options(options: EvalOptions) -> None:
    for iou_type in options.iou_types:
        if iou_type not in IOU_TYPES:
            raise UserError(f"unknown IoU type {iou_type!r}; choose from {IOU_TYPES}")
    for t in options.iou_thresholds:
        if not 0.0 < t < 1.0:
            raise UserError(f"--iou_thresholds: {t} is not in (0, 1)")
    for k in options.max_dets:
        if int(k) != k or k < 1:
            raise UserError(f"--max_dets: {k} is not a positive whole number")


def evaluate_instances(pred_path: str | os.PathLike, gt_path: str | os.PathLike, options: EvalOptions) -> EvalResult:
    """Evaluate a predictions file (results list or COCO dict) against a COCO GT file."""
    check_options(options)
    gt = load_coco_dataset(gt_path)
    anns, dataset = load_predictions(pred_path)
    # Both files name their images: match them by name whatever their ids, and evaluate the predictions' images.
    if not options.class_agnostic and dataset is not None:
        check_category_names(dataset.get("categories") or [], gt["categories"], str(pred_path), str(gt_path))
    anns, matched_ids = match_by_file_name(anns, dataset, gt["images"], str(pred_path), str(gt_path))
    if matched_ids is None:
        result = evaluate_predictions(anns, gt, options, str(pred_path), str(gt_path),
                                      names_images=names_all_images((dataset or {}).get("images")))
    else:
        kept = set(matched_ids)
        subset = {**gt, "images": [img for img in gt["images"] if img["id"] in kept],
                  "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
        result = evaluate_predictions(anns, subset, options, str(pred_path), str(gt_path))
        result.notes.insert(0, f"scored over {len(kept)} of {len(gt['images'])} GT images (matched by file_name)")
    result.reference = reference_name(gt, gt_path)
    return result


def evaluate_predictions(anns: list[dict], gt_dataset: dict, options: EvalOptions, pred_source: str = "predictions",
                         gt_source: str = "ground truth", agnostic_recall: bool = True,
                         names_images: bool = True) -> EvalResult:
    """Evaluate in-memory COCO results against an in-memory COCO dataset (neither is modified).

    `anns` are results as `load_predictions` returns them (checked, with scores); `pred_source` and
    `gt_source` name them in error messages. `agnostic_recall=False` skips the extra class-agnostic
    evaluation of class-specific runs (no `AR_agnostic` in the metrics then). With
    `options.max_dets`, the metrics hold `AR_open_world` (see `open_world_recall`). `names_images=False` (a
    results list) says, for an image id the GT lacks, which file to pass instead.
    """
    check_options(options)
    require_gt_fields(gt_dataset["annotations"], options.iou_types, gt_source)
    # Annotations copied: pycocotools' COCOeval writes into the GT annotations it evaluates.
    gt = {"images": gt_dataset["images"], "annotations": [dict(a) for a in gt_dataset["annotations"]],
          "categories": gt_dataset["categories"]}
    full_gt = dict(gt)  # every category, for the open-world recall
    if not gt["categories"]:
        raise UserError(f"{gt_source} has no 'categories'")
    check_image_ids(anns, gt, pred_source, gt_source, names_images)
    images = {img["id"]: img for img in gt["images"]}
    if "segm" in options.iou_types:
        check_gt_masks_not_empty(gt["annotations"], images, gt_source)
    predictions = normalise_predictions(anns, images, pred_source, need_category=not options.class_agnostic)
    gt_ids = [c["id"] for c in gt["categories"]]
    if not options.class_agnostic or options.eval_classes:  # then the GT objects' categories count
        check_category_ids(gt["annotations"], gt_ids, gt_source, "annotations",
                           "add their categories to 'categories', or correct the ids")
    if not options.class_agnostic:
        check_category_ids(predictions, gt_ids, pred_source, "predictions",
                           "map the predicted ids to the GT's, or pass --class_agnostic to ignore categories")
    notes: list[str] = []

    # Category subset and class-agnostic folding.
    eval_ids = resolve_categories(gt, options.eval_classes) if options.eval_classes else None
    if options.class_agnostic:
        if eval_ids is not None:  # cross-category protocol: only GT objects of the subset remain
            gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] in eval_ids]
        gt["annotations"] = fold_categories(gt["annotations"])
        gt["categories"] = [dict(OBJECT_CATEGORY)]
        predictions = fold_categories(predictions)
        cat_ids = [OBJECT_CATEGORY["id"]]
    else:
        cat_ids = eval_ids if eval_ids is not None else sorted(c["id"] for c in gt["categories"])
        pred_ids = {a["category_id"] for a in predictions}
        if predictions and not pred_ids & set(cat_ids):
            raise UserError(f"no prediction has a category id of the evaluated GT categories (predictions use "
                            f"{sorted(pred_ids)[:8]}); for class-agnostic masks pass --class_agnostic")

    if options.max_dets and not options.most_confident:
        scope = f"the {len(eval_ids)} --eval_classes, other categories' GT ignored" if eval_ids else "all categories"
        notes.append(f"open-world AR: class-agnostic recall of the GT of {scope}")
    if options.most_confident:
        predictions, gt, unpaired = select_most_confident(predictions, gt)
        notes.append(f"most-confident protocol: {len(predictions)} predictions, {len(gt['annotations'])} paired GT objects")
        if unpaired:
            notes.append(f"{unpaired} selected predictions are on images without a non-crowd GT object "
                         "(counted as false positives)")

    gt_coco = coco_from_dict(gt)
    result = EvalResult(options=asdict(options), num_images=len(gt["images"]), num_predictions=len(predictions),
                        num_gt=len(gt["annotations"]), eval_category_ids=list(cat_ids), notes=notes)
    default_thrs = COCOeval(iouType="segm").params.iouThrs
    for iou_type in options.iou_types:
        preds = for_iou_type(predictions, iou_type, pred_source)
        evaluator, table = run_cocoeval(gt_coco, preds, iou_type, cat_ids=cat_ids)
        metrics: dict = {name: _percent(v) for name, v in zip(STAT_NAMES, evaluator.stats)}

        if options.iou_thresholds:
            extra = [t for t in options.iou_thresholds if not np.isclose(default_thrs, t).any()]
            extra_eval = run_cocoeval(gt_coco, preds, iou_type, cat_ids=cat_ids, iou_thrs=extra)[0] if extra else None
            metrics["mAP^r"] = {
                f"{t:g}": _percent(ap_at_iou(extra_eval if t in extra else evaluator, t)) for t in options.iou_thresholds
            }

        # Class-agnostic recall (the open-world measure): all categories of the evaluated set in one.
        agnostic = None
        if options.class_agnostic:
            agnostic = evaluator
        elif agnostic_recall:
            agn_gt = dict(gt)
            agn_gt["annotations"] = fold_categories([a for a in gt["annotations"] if a["category_id"] in cat_ids])
            agn_gt["categories"] = [dict(OBJECT_CATEGORY)]
            agnostic = run_cocoeval(coco_from_dict(agn_gt), fold_categories(preds), iou_type)[0]
        if agnostic is not None:
            metrics["AR_agnostic"] = {name: _percent(agnostic.stats[i])
                                      for i, name in ((6, "AR1"), (7, "AR10"), (8, "AR100"))}
        if options.max_dets and not options.most_confident:
            metrics["AR_open_world"] = open_world_recall(preds, full_gt, eval_ids, iou_type, options.max_dets)
        result.metrics[iou_type] = metrics
        result.summaries[iou_type] = table
    return result


def ap_rows(result: EvalResult, label: str, against: str, stage: str, stats: Iterable[str] = ("AP", "AP50"),
            ) -> list[MetricRow]:
    """The `stats` of each evaluated IoU type as rows named "<label> mask <stat>" (segm) and "<label> box <stat>"
    (bbox), mask first."""
    rows = []
    for iou_type, name in (("segm", "mask"), ("bbox", "box")):
        table = result.metrics.get(iou_type) or {}
        rows += [MetricRow(stage, f"{label} {name} {stat}", table[stat], against) for stat in stats if stat in table]
    return rows


def format_report(result: EvalResult) -> str:
    """Human-readable report; the last line is the AP50 of the main IoU type (segm if evaluated)."""

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    lines = [f"evaluated {result.num_predictions} predictions against {result.num_gt} objects "
             f"in {result.num_images} images ({len(result.eval_category_ids)} categories) of "
             f"{result.reference or 'the ground truth'}"]
    lines += [f"note: {n}" for n in result.notes]
    order = [t for t in ("bbox", "segm") if t in result.metrics]
    for iou_type in order:
        m = result.metrics[iou_type]
        lines.append(f"--- {iou_type} (pycocotools) ---")
        lines.append(result.summaries[iou_type].rstrip())
        lines.append(f"{iou_type}: " + "  ".join(f"{k} {fmt(m[k])}" for k in STAT_NAMES))
        if "mAP^r" in m:
            lines.append(f"{iou_type} mAP^r: " + "  ".join(f"@{k} {fmt(v)}" for k, v in m["mAP^r"].items()))
        if "AR_agnostic" in m:
            lines.append(f"{iou_type} class-agnostic: " + "  ".join(f"{k} {fmt(v)}" for k, v in m["AR_agnostic"].items()))
        if "AR_open_world" in m:
            lines.append(f"{iou_type} open-world AR: " + "  ".join(f"{k} {fmt(v)}" for k, v in m["AR_open_world"].items()))
    main = order[-1]
    lines.append(f"{main} AP50: {fmt(result.metrics[main]['AP50'])}")
    return "\n".join(lines)
