"""Open-world AR@k (GGN's cross-category protocol) on a hand-made case, and equality with pycocotools
when no category is left out."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.coco_eval import EvalOptions, evaluate_predictions, format_report, open_world_recall
from utils.coco_io import make_annotation
from tests.helpers.coco_perturb import perturbed_predictions
from utils.errors import UserError

SIZE = 64


def box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def hand_made() -> tuple[dict, list[dict]]:
    """Image 1: P (category 1, seen) and the unseen Q and R (category 2). Its detections by score:
    P exactly (0.9), a miss (0.8), Q exactly (0.7), R shifted by 3 rows (0.6, IoU 208/304 = 0.684:
    a hit at the IoU thresholds 0.50-0.65, 4 of 10). Image 2: the unseen S, found exactly (0.5),
    and a duplicate of it (0.4, a miss)."""
    objects = [(box_mask(0, 0, 20, 20), 1, 1), (box_mask(30, 30, 20, 20), 1, 2), (box_mask(0, 40, 16, 16), 1, 2),
               (box_mask(10, 10, 30, 30), 2, 2)]
    gt_anns = []
    for k, (mask, image_id, category) in enumerate(objects):
        ann = make_annotation(mask, image_id, category, ann_id=k + 1)
        ann.pop("score")
        gt_anns.append(ann)
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": SIZE, "height": SIZE} for i in (1, 2)],
          "annotations": gt_anns, "categories": [{"id": 1, "name": "seen"}, {"id": 2, "name": "unseen"}]}
    detections = [(box_mask(0, 0, 20, 20), 1, 0.9), (box_mask(44, 0, 20, 20), 1, 0.8), (box_mask(30, 30, 20, 20), 1, 0.7),
                  (box_mask(0, 43, 16, 16), 1, 0.6), (box_mask(10, 10, 30, 30), 2, 0.5), (box_mask(10, 10, 30, 30), 2, 0.4)]
    return gt, [make_annotation(mask, image_id, 1, score) for mask, image_id, score in detections]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_unseen_recall_ignores_seen_objects_and_frees_their_places(iou_type):
    gt, preds = hand_made()
    options = EvalOptions(iou_types=(iou_type,), class_agnostic=True, eval_classes=("unseen",), max_dets=(1, 2, 3))
    ow = evaluate_predictions(preds, gt, options).metrics[iou_type]["AR_open_world"]
    # The detection of P is dropped: image 1 ranks [miss, Q, R], image 2 [S, duplicate].
    # AR@1: S only, 1/3. AR@2: Q and S, 2/3. AR@3: R too at 4 of 10 thresholds: (4 * 3/3 + 6 * 2/3) / 10.
    assert ow["AR@1"] == pytest.approx(100 / 3)
    assert ow["AR@2"] == pytest.approx(200 / 3)
    assert ow["AR@3"] == pytest.approx(80.0)
    # Areas 400, 256, 900 are all small (< 32^2): no medium or large GT object.
    assert ow["ARs@3"] == pytest.approx(80.0) and ow["ARm@3"] is None and ow["ARl@3"] is None

    # Without the protocol, P's GT removed (the AP protocol of --eval_classes): its detection is a miss
    # that takes image 1's first place. AR@1: S; AR@2: S; AR@3: Q and S.
    plain = evaluate_predictions(preds, gt, EvalOptions(iou_types=(iou_type,), class_agnostic=True,
                                                        eval_classes=("unseen",))).metrics[iou_type]
    assert plain["AR1"] == pytest.approx(100 / 3) and plain["AR10"] == pytest.approx(80.0)
    removed = [a for a in gt["annotations"] if a["category_id"] == 2]
    reference = COCO()
    reference.dataset = {**gt, "annotations": [dict(a, category_id=1) for a in removed], "categories": [{"id": 1}]}
    reference.createIndex()
    evaluator = COCOeval(reference, reference.loadRes([{k: v for k, v in p.items() if k != "bbox" or iou_type == "bbox"}
                                                       for p in preds]), iou_type)
    evaluator.params.maxDets = [1, 2, 3]
    evaluator.evaluate()
    evaluator.accumulate()
    assert [float(np.mean(evaluator.eval["recall"][:, 0, 0, m])) for m in range(3)] == pytest.approx([1 / 3, 1 / 3, 2 / 3])

    # Every category evaluated: P is a regular object, found by the first detection.
    everything = evaluate_predictions(preds, gt, EvalOptions(iou_types=(iou_type,), class_agnostic=True,
                                                             max_dets=(1, 2, 3))).metrics[iou_type]["AR_open_world"]
    assert everything["AR@1"] == pytest.approx(50.0)  # P and S of 4
    assert everything["AR@3"] == pytest.approx(75.0)  # P, Q, S; R is 4th in image 1


def test_without_a_subset_it_equals_pycocotools_agnostic_recall(tiny_coco):
    gt_path = tiny_coco / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_path.read_text())
    dets = [{k: v for k, v in p.items() if k != "segmentation"} for p in perturbed_predictions(gt)]
    ks = (1, 3, 10)
    ours = open_world_recall(dets, gt, None, "bbox", ks)

    reference = COCO(str(gt_path))
    for a in reference.dataset["annotations"]:
        a["category_id"] = 1
    reference.dataset["categories"] = [{"id": 1, "name": "object"}]
    reference.createIndex()
    dets = [dict(d, category_id=1) for d in dets]
    evaluator = COCOeval(reference, reference.loadRes(dets), "bbox")
    evaluator.params.maxDets = list(ks)
    evaluator.evaluate()
    evaluator.accumulate()
    recall = evaluator.eval["recall"]
    for m, k in enumerate(ks):
        expected = recall[:, 0, 0, m]
        assert ours[f"AR@{k}"] == pytest.approx(100 * float(np.mean(expected[expected > -1])), abs=1e-9)
    assert 0 < ours["AR@1"] < ours["AR@3"] < ours["AR@10"] < 95  # non-trivial numbers


def test_cli_reports_open_world_recall_and_checks_max_dets(tmp_path, repo_root):
    gt, preds = hand_made()
    gt_path, pred_path, out = tmp_path / "gt.json", tmp_path / "p.json", tmp_path / "m.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(preds))
    proc = subprocess.run([sys.executable, "eval_instances.py", "--input_file", str(pred_path), "--gt_file", str(gt_path),
                           "--class_agnostic", "--eval_classes", "unseen", "--iou_type", "bbox", "--out_json", str(out)],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())["metrics"]["bbox"]["AR_open_world"]
    assert sorted(saved) == sorted(["AR@10", "AR@20", "AR@50", "AR@100", "ARs@100", "ARm@100", "ARl@100"])
    assert saved["AR@10"] == pytest.approx(80.0)  # all five kept detections fit in 10
    assert "bbox open-world AR: AR@10 80.00  AR@20 80.00" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("bbox AP50: ")
    with pytest.raises(UserError, match="--max_dets: 0"):
        evaluate_predictions(preds, gt, EvalOptions(class_agnostic=True, max_dets=(0,)))
    assert "open-world" not in format_report(evaluate_predictions(preds, gt, EvalOptions(iou_types=("bbox",),
                                                                                          class_agnostic=True)))
