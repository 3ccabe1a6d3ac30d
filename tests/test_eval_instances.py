"""eval_instances: every number equals pycocotools' own; the most-confident protocol; bad input."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.coco_eval import STAT_NAMES, EvalOptions, evaluate_instances, evaluate_predictions, format_report
from utils.coco_io import decode_segmentation, make_annotation, mask_to_rle
from tests.helpers.coco_perturb import perturbed_predictions, uncompressed_rle
from utils.errors import UserError


def reference_stats(gt_path, preds: list[dict], iou_type: str, agnostic: bool = False, cat_ids=None,
                    iou_thrs=None) -> np.ndarray:
    """pycocotools run directly, as detectron2 does (mask AP without the bbox field)."""
    gt = COCO(str(gt_path))
    preds = copy.deepcopy(preds)
    if agnostic:
        gt.dataset["categories"] = [{"id": 1, "name": "object"}]
        for a in gt.dataset["annotations"]:
            a["category_id"] = 1
        gt.createIndex()
    for p in preds:
        img = gt.imgs[p["image_id"]]
        if agnostic:
            p["category_id"] = 1
        if iou_type == "segm":
            segm = p["segmentation"]
            if isinstance(segm, list):
                segm = mask_utils.merge(mask_utils.frPyObjects(segm, img["height"], img["width"]))
            elif isinstance(segm["counts"], list):
                segm = mask_utils.frPyObjects(segm, img["height"], img["width"])
            p["segmentation"] = segm
            p.pop("bbox")
        else:
            p.pop("segmentation")
    evaluator = COCOeval(gt, gt.loadRes(preds), iou_type)
    if cat_ids is not None:
        evaluator.params.catIds = cat_ids
    if iou_thrs is not None:
        evaluator.params.iouThrs = np.array(iou_thrs)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _assert_equal(ours: dict, stats: np.ndarray) -> None:
    for name, value in zip(STAT_NAMES, stats):
        if value < 0:
            assert ours[name] is None, name
        else:
            assert ours[name] == pytest.approx(100 * value, abs=1e-9), name


@pytest.fixture
def perturbed(tiny_coco, tmp_path):
    gt_path = tiny_coco / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_path.read_text())
    preds = perturbed_predictions(gt)
    pred_path = tmp_path / "preds.json"
    pred_path.write_text(json.dumps(preds))
    return gt_path, gt, preds, pred_path


def test_every_number_equals_pycocotools(perturbed):
    gt_path, gt, preds, pred_path = perturbed
    assert {type(p["segmentation"]).__name__ for p in preds} == {"list", "dict"}
    result = evaluate_instances(pred_path, gt_path, EvalOptions(iou_types=("segm", "bbox"), iou_thresholds=(0.5, 0.7, 0.62)))
    assert result.num_predictions == len(preds)
    for iou_type in ("segm", "bbox"):
        ours = result.metrics[iou_type]
        stats = reference_stats(gt_path, preds, iou_type)
        assert 5 < 100 * stats[1] < 95  # the perturbation gives a non-trivial number
        _assert_equal(ours, stats)
        for t in (0.5, 0.7, 0.62):  # mAP^r: pycocotools with only that IoU threshold
            assert ours["mAP^r"][f"{t:g}"] == pytest.approx(100 * reference_stats(gt_path, preds, iou_type, iou_thrs=[t])[0])
        agnostic = reference_stats(gt_path, preds, iou_type, agnostic=True)
        for i, name in ((6, "AR1"), (7, "AR10"), (8, "AR100")):
            assert ours["AR_agnostic"][name] == pytest.approx(100 * agnostic[i], abs=1e-9)

    folded = evaluate_instances(pred_path, gt_path, EvalOptions(class_agnostic=True))
    _assert_equal(folded.metrics["segm"], reference_stats(gt_path, preds, "segm", agnostic=True))

    subset = evaluate_instances(pred_path, gt_path, EvalOptions(iou_types=("bbox",), eval_classes=("person", "3", "62")))
    assert subset.eval_category_ids == [1, 3, 62]
    _assert_equal(subset.metrics["bbox"], reference_stats(gt_path, preds, "bbox", cat_ids=[1, 3, 62]))
    with pytest.raises(UserError, match="unicorn"):
        evaluate_instances(pred_path, gt_path, EvalOptions(eval_classes=("unicorn",)))


def test_in_memory_entry_point_and_mask_rcnn_summary(perturbed):
    """evaluate_predictions leaves its inputs alone; the Mask R-CNN engine's summary is pycocotools' AP."""
    from detectron2_train.engine import coco_evaluate

    gt_path, gt, preds, pred_path = perturbed
    before = copy.deepcopy((gt, preds))
    result = evaluate_predictions(preds, gt, EvalOptions(iou_types=("bbox",)), agnostic_recall=False)
    assert (gt, preds) == before
    assert "AR_agnostic" not in result.metrics["bbox"] and "class-agnostic" not in format_report(result)
    _assert_equal(result.metrics["bbox"], reference_stats(gt_path, preds, "bbox"))

    summary = coco_evaluate(str(gt_path), preds)
    assert sorted(summary) == ["bbox", "segm"] and all(sorted(s) == ["AP", "AP50", "AP75"] for s in summary.values())
    assert summary["bbox"] == pytest.approx({k: result.metrics["bbox"][k] for k in ("AP", "AP50", "AP75")})
    segm = reference_stats(gt_path, preds, "segm", agnostic=True)
    agnostic = coco_evaluate(str(gt_path), preds, class_agnostic=True)
    assert agnostic["segm"] == pytest.approx({"AP": 100 * segm[0], "AP50": 100 * segm[1], "AP75": 100 * segm[2]})


def test_cli_prints_ap50_last_and_writes_json(perturbed, tmp_path, repo_root):
    gt_path, gt, preds, pred_path = perturbed
    full = {"images": gt["images"], "annotations": preds, "categories": gt["categories"]}  # a full dict works too
    pred_path.write_text(json.dumps(full))
    out_json = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "eval_instances.py", "--input_file", str(pred_path), "--gt_file", str(gt_path),
                           "--iou_type", "both", "--out_json", str(out_json)], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out_json.read_text())
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"segm AP50: {saved['metrics']['segm']['AP50']:.2f}"
    assert saved["metrics"]["segm"]["AP50"] == pytest.approx(100 * reference_stats(gt_path, preds, "segm")[1])


def test_malformed_entries_are_named_and_nothing_is_printed(perturbed, tmp_path, repo_root):
    gt_path, gt, preds, pred_path = perturbed
    cases = {
        "#5 has a malformed polygon": lambda p: p[5].update(segmentation=[[1.0, 2.0, 3.0]]),
        "#7 has an RLE of size": lambda p: p[7].update(segmentation={"size": [1, 1], "counts": "1"}),
        "#3 has image_id 123": lambda p: p[3].update(image_id=123),
        "#4 has no 'category_id'": lambda p: p[4].pop("category_id"),
        "#9 has a non-numeric 'score'": lambda p: p[9].update(score="high"),
    }
    for message, corrupt in cases.items():
        bad = copy.deepcopy(preds)
        for p in bad:  # RLE everywhere so that index 7 is an RLE
            if isinstance(p["segmentation"], list):
                img = next(i for i in gt["images"] if i["id"] == p["image_id"])
                p["segmentation"] = mask_to_rle(decode_segmentation(p["segmentation"], img["height"], img["width"]))
        corrupt(bad)
        pred_path.write_text(json.dumps(bad))
        proc = subprocess.run([sys.executable, "eval_instances.py", "--input_file", str(pred_path), "--gt_file",
                               str(gt_path), "--out_json", str(tmp_path / "m.json")], cwd=repo_root,
                              capture_output=True, text=True)
        assert proc.returncode == 2, message
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "AP" not in proc.stdout and not (tmp_path / "m.json").exists()
    # Category-aware evaluation of class-agnostic masks would give a silent 0: it is refused.
    for p in preds:
        p["category_id"] = 999
    pred_path.write_text(json.dumps(preds))
    with pytest.raises(UserError, match="--class_agnostic"):
        evaluate_instances(pred_path, gt_path, EvalOptions())


def test_most_confident_protocol_hand_made(tmp_path):
    """Image 1: GT objects A (big) and B (small). The most confident prediction covers B exactly; a
    less confident one covering A is dropped. Image 2: GT object C; the most confident prediction
    misses it (IoU < 0.5) and the correct, less confident one is dropped. Image 3 has no prediction.
    Selected: 2 predictions, paired GT {B, C}: the 0.9 prediction is a TP, the 0.8 one a FP, so
    precision is 1 up to recall 0.5 and AP50 = 51/101 (101-point interpolation)."""
    h = w = 64
    a, b, c, d = (np.zeros((h, w), np.uint8) for _ in range(4))
    a[4:60, 4:40] = 1
    b[40:56, 44:60] = 1
    c[10:30, 10:30] = 1
    d[20:60, 20:60] = 1  # in image 3
    gt_anns = [make_annotation(m, i, 1, ann_id=k + 1) for k, (m, i) in enumerate([(a, 1), (b, 1), (c, 2), (d, 3)])]
    for ann in gt_anns:
        ann.pop("score")
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i in (1, 2, 3)],
          "annotations": gt_anns, "categories": [{"id": 1, "name": "object"}]}
    wrong = np.zeros((h, w), np.uint8)
    wrong[40:64, 40:64] = 1  # IoU with C is 0; with nothing else in image 2
    preds = [make_annotation(b, 1, 1, 0.9), make_annotation(a, 1, 1, 0.5),
             make_annotation(wrong, 2, 1, 0.8), make_annotation(c, 2, 1, 0.7)]
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "p.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(preds))

    result = evaluate_instances(pred_path, gt_path, EvalOptions(most_confident=True, class_agnostic=True))
    assert (result.num_predictions, result.num_gt) == (2, 2)
    assert result.metrics["segm"]["AP50"] == pytest.approx(100 * 51 / 101)
    assert result.metrics["segm"]["AR100"] == pytest.approx(50.0)
    assert format_report(result).splitlines()[-1] == f"segm AP50: {100 * 51 / 101:.2f}"
    # Without the protocol, all 4 predictions count against all 4 GT objects: 3 TPs ranked 0.9, 0.7, 0.5
    # around one FP at 0.8, recall 3/4 at most.
    full = evaluate_instances(pred_path, gt_path, EvalOptions(class_agnostic=True))
    assert full.metrics["segm"]["AR100"] == pytest.approx(75.0)
    assert full.metrics["segm"]["AP50"] != result.metrics["segm"]["AP50"]


def test_most_confident_on_perturbed_predictions_equals_pycocotools(perturbed, tmp_path):
    """The protocol rebuilt by hand with pycocotools' own box IoU, then evaluated by pycocotools directly."""
    gt_path, gt, preds, pred_path = perturbed
    best: dict = {}
    for p in preds:
        if p["image_id"] not in best or p["score"] > best[p["image_id"]]["score"]:
            best[p["image_id"]] = p
    paired = []
    for image_id, p in best.items():
        candidates = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        if candidates:
            ious = mask_utils.iou([p["bbox"]], [a["bbox"] for a in candidates], [0] * len(candidates))[0]
            paired.append(candidates[int(np.argmax(ious))])
    sel_gt = tmp_path / "gt_sel.json"
    sel_gt.write_text(json.dumps(dict(gt, annotations=paired)))
    result = evaluate_instances(pred_path, gt_path, EvalOptions(iou_types=("segm", "bbox"), most_confident=True,
                                                                class_agnostic=True))
    assert (result.num_predictions, result.num_gt) == (len(best), len(paired))
    for iou_type in ("segm", "bbox"):
        stats = reference_stats(sel_gt, list(best.values()), iou_type, agnostic=True)
        assert 5 < 100 * stats[1] < 95
        _assert_equal(result.metrics[iou_type], stats)


def test_uncompressed_rle_round_trips_masks_starting_with_a_set_pixel():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 9, size=2))
        mask = (rng.random((h, w)) < 0.5).astype(np.uint8)
        mask[0, 0] = rng.integers(2)
        decoded = mask_utils.decode(mask_utils.frPyObjects(uncompressed_rle(mask), h, w))
        assert np.array_equal(decoded, mask)


def test_non_finite_numbers_and_unwritable_output_are_one_line_errors(perturbed, tmp_path, repo_root):
    gt_path, gt, preds, pred_path = perturbed
    for message, corrupt in {"#2 has a non-finite 'score'": lambda p: p[2].update(score=float("nan")),
                             "#6 has a 'bbox'": lambda p: p[6].update(bbox=[0, 0, -4, 5])}.items():
        bad = copy.deepcopy(preds)
        corrupt(bad)
        pred_path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=message):
            evaluate_instances(pred_path, gt_path, EvalOptions(iou_types=("bbox",)))
    pred_path.write_text(json.dumps(preds))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "eval_instances.py", "--input_file", str(pred_path), "--gt_file", str(gt_path),
                           "--out_json", str(blocker / "m.json")], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot write output") and "AP" not in proc.stdout


def test_most_confident_protocol_keeps_the_first_of_tied_predictions():
    """Two images, each with one GT box and two predictions of equal score: the first in the file is the
    image's most confident one (MaskDistill's protocol, as CorLoc's). Image 1's first hits its object, image
    2's first misses it, so the hit (0.5) ranks above the miss (0.3): AP50 = 51/101 (101-point interpolation).
    Keeping the last of a tie instead ranks the miss first (AP50 halved); keeping the better box gives 100."""
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in (1, 2)],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0} for i in (1, 2)],
          "categories": [{"id": 1, "name": "object"}]}
    hit, miss = [0, 0, 10, 10], [40, 40, 10, 10]
    preds = [{"image_id": 1, "category_id": 1, "bbox": hit, "score": 0.5},
             {"image_id": 1, "category_id": 1, "bbox": miss, "score": 0.5},
             {"image_id": 2, "category_id": 1, "bbox": miss, "score": 0.3},
             {"image_id": 2, "category_id": 1, "bbox": hit, "score": 0.3}]
    options = EvalOptions(iou_types=("bbox",), most_confident=True, class_agnostic=True)
    result = evaluate_predictions(preds, gt, options)
    assert (result.num_predictions, result.num_gt) == (2, 2)
    assert result.metrics["bbox"]["AP50"] == pytest.approx(100 * 51 / 101)


def test_most_confident_prediction_is_never_paired_with_a_crowd_region():
    """The protocol pairs the selected prediction with the GT object of highest box IoU among the non-crowd
    ones: here the crowd region overlaps it more (IoU 110/120) than the object does (100/110), yet the object
    is its pair, a hit at IoU 0.5. Paired with the crowd region, nothing would be left to find (AP undefined)."""
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 64}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 12], "area": 120,
                           "iscrowd": 1},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "object"}]}
    preds = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 11], "score": 0.9}]
    result = evaluate_predictions(preds, gt, EvalOptions(iou_types=("bbox",), most_confident=True, class_agnostic=True))
    assert (result.num_predictions, result.num_gt) == (1, 1)
    assert result.metrics["bbox"]["AP50"] == pytest.approx(100.0)
