"""The most-confident pick (evaluation/most_confident.py), written once for CorLoc and the single-object COCO
protocol: the tie rule (the FIRST of tied top scores) decides a hand-made outcome in both evaluators."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.coco_eval import EvalOptions, evaluate_instances
from evaluation.corloc import evaluate_corloc
from evaluation.most_confident import most_confident
from utils.coco_io import make_annotation

H = W = 64


def test_the_highest_score_wins_and_ties_keep_the_first():
    preds = [{"image_id": 2, "score": 0.5, "n": 0}, {"image_id": 1, "score": 0.5, "n": 1},
             {"image_id": 1, "score": 0.5, "n": 2}, {"image_id": 2, "score": 0.7, "n": 3},
             {"image_id": 2, "score": 0.7, "n": 4}, {"image_id": 2, "score": 0.6, "n": 5}]
    best = most_confident(preds)
    assert list(best) == [2, 1]  # the keys in the order they first appear
    assert {k: p["n"] for k, p in best.items()} == {2: 3, 1: 1}
    assert {k: p["n"] for k, p in most_confident(preds, ["a"] * 6).items()} == {"a": 3}
    with pytest.raises(ValueError):
        most_confident(preds, [1])


def _files(tmp_path, preds: list[dict]) -> tuple[str, str]:
    """One 64x64 image whose single GT object is the top-left square; `preds` as a results list."""
    gt_mask = np.zeros((H, W), np.uint8)
    gt_mask[0:32, 0:32] = 1
    gt_ann = make_annotation(gt_mask, 1, 1, ann_id=1)
    gt_ann.pop("score")
    gt = {"images": [{"id": 1, "file_name": "1.jpg", "width": W, "height": H}], "annotations": [gt_ann],
          "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    return str(tmp_path / "p.json"), str(tmp_path / "gt.json")


def _tied(hit_first: bool) -> list[dict]:
    """Two predictions of the same score: one on the GT square, one in the opposite corner (IoU 0)."""
    hit, miss = np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)
    hit[0:32, 0:32] = 1
    miss[32:64, 32:64] = 1
    pair = [make_annotation(hit, 1, 1, 0.8), make_annotation(miss, 1, 1, 0.8)]
    return pair if hit_first else pair[::-1]


@pytest.mark.parametrize("hit_first", [True, False])
def test_corloc_takes_the_first_of_tied_predictions(tmp_path, hit_first):
    preds, gt = _files(tmp_path, _tied(hit_first))
    assert evaluate_corloc(preds, gt_file=gt).corloc == (100.0 if hit_first else 0.0)


@pytest.mark.parametrize("hit_first", [True, False])
def test_most_confident_ap_takes_the_first_of_tied_predictions(tmp_path, hit_first):
    preds, gt = _files(tmp_path, _tied(hit_first))
    result = evaluate_instances(preds, gt, EvalOptions(iou_types=("segm", "bbox"), most_confident=True,
                                                       class_agnostic=True))
    assert result.num_predictions == 1
    for iou_type in ("segm", "bbox"):
        assert result.metrics[iou_type]["AP50"] == pytest.approx(100.0 if hit_first else 0.0)
