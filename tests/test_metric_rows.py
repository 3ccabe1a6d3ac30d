"""The one metric interface (evaluation/rows.py): each metric family's rows carry its numbers unchanged, under
the names and with the references the pipeline's metrics.json has always had."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.coco_eval import EvalResult, ap_rows
from evaluation.corloc import GroundTruthBoxes, corloc, corloc_row
from evaluation.metrics import clustering_rows, miou_row
from evaluation.rows import MetricRow, rows_to_json


def test_a_row_serialises_in_the_key_order_of_metrics_json():
    row = MetricRow("masks", "lost masks CorLoc", 12.5, "gt.json boxes")
    assert json.dumps(rows_to_json([row])) == (
        '[{"metric": "lost masks CorLoc", "value": 12.5, "against": "gt.json boxes", "stage": "masks"}]')


def test_ap_rows_give_mask_then_box_ap_and_ap50_unchanged():
    result = EvalResult(options={}, num_images=1, num_predictions=1, num_gt=1, eval_category_ids=[1],
                        metrics={"bbox": {"AP": 30.0, "AP50": None, "AR1": 7.0},
                                 "segm": {"AP": 10.0, "AP50": 20.0, "AR1": 8.0}})
    rows = ap_rows(result, "lost masks", "gt.json", "masks")
    assert rows == [MetricRow("masks", "lost masks mask AP", 10.0, "gt.json"),
                    MetricRow("masks", "lost masks mask AP50", 20.0, "gt.json"),
                    MetricRow("masks", "lost masks box AP", 30.0, "gt.json"),
                    MetricRow("masks", "lost masks box AP50", None, "gt.json")]
    only_box = EvalResult(options={}, num_images=1, num_predictions=1, num_gt=1, eval_category_ids=[1],
                          metrics={"bbox": {"AP": 30.0, "AP50": 40.0}})
    assert [r.metric for r in ap_rows(only_box, "x", "y", "z", stats=("AP50",))] == ["x box AP50"]


def test_corloc_row_names_its_protocol_and_the_counted_images():
    gt = GroundTruthBoxes(boxes={1: np.array([[0.0, 0, 10, 10]]), 2: np.array([[0.0, 0, 10, 10]]),
                                 3: np.zeros((0, 4))}, source="gt.json")
    # image 1: IoU 0.8 (a hit at 0.7); image 2: IoU 0.6 (a miss at 0.7); image 3: no GT box (a miss)
    result = corloc({1: [0, 0, 10, 8], 2: [0, 0, 10, 6]}, gt, iou_threshold=0.7)
    row = corloc_row(result, "tokencut masks", "gt.json boxes", "masks")
    assert row == MetricRow("masks", "tokencut masks CorLoc", pytest.approx(100 / 3),
                            "gt.json boxes (most confident mask per image, IoU >= 0.7, 3 images)")


def test_clustering_rows_keep_the_reported_scores_and_say_how_clusters_were_matched():
    scores = {"ACC": 50.0, "NMI": 12.5, "ARI_std": 1.0, "matching": "majority", "num_classes": 7}
    assert clustering_rows(scores, "gt.json classes") == [
        MetricRow("cluster", "clustering ACC", 50.0, "gt.json classes (majority matching, 7 clusters)"),
        MetricRow("cluster", "clustering NMI", 12.5, "gt.json classes (majority matching, 7 clusters)")]
    assert clustering_rows({"num_clusters": 3}, "gt.json classes") == []  # without a GT: no rows


def test_miou_row_is_in_percent():
    assert miou_row({"mIoU": 0.25, "per_class_iou": {}}, "DeepLab mIoU", "gt maps", "deeplab") == MetricRow(
        "deeplab", "DeepLab mIoU", 25.0, "gt maps")
