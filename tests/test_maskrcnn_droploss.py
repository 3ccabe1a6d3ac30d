"""DropLoss: RoIs that overlap no pseudo box cost no classification loss; the loss otherwise equals torchvision's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import fastrcnn_loss

from detectron2_train.droploss import droploss_weights, fast_rcnn_loss, predicted_boxes
from detectron2_train.engine import DEFAULTS
from detectron2_train.modeling import build_model
from utils.config import load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "tiny_test.yaml"
LABELLED = [8.0, 8.0, 28.0, 28.0]  # the object the pseudo-masks found
UNLABELLED = [40.0, 36.0, 60.0, 60.0]  # an object they missed: IoU 0 with the labelled box


def test_droploss_weights_threshold_and_images_without_boxes():
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros((0, 4))]
    rois = [torch.tensor([[0.0, 0.0, 10.0, 10.0],  # IoU 1
                          [9.0, 9.0, 19.0, 19.0],  # IoU 1/199
                          [9.0, 0.0, 19.0, 10.0],  # IoU 10/190
                          [20.0, 20.0, 30.0, 30.0]]),  # IoU 0
            torch.tensor([[0.0, 0.0, 5.0, 5.0]])]  # an image without pseudo boxes keeps its RoIs
    assert droploss_weights(rois, gt, 0.01).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert droploss_weights(rois, gt, 0.06).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_droploss_drops_a_roi_whose_max_iou_equals_the_threshold():
    """CutLER drops a RoI when its max IoU <= the threshold: one exactly at the threshold is dropped, and at
    threshold 0 (which model.droploss_iou allows) a RoI overlapping no pseudo box still is."""
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])]
    rois = [torch.tensor([[0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with the first box, exactly
                          [0.0, 0.0, 10.0, 6.0],  # IoU 0.6
                          [20.0, 20.0, 30.0, 30.0],  # IoU 0 with both
                          [50.0, 50.0, 60.0, 55.0]])]  # IoU 0 with the first, 0.5 with the second
    assert droploss_weights(rois, gt, 0.5).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert droploss_weights(rois, gt, 0.0).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_predicted_box_takes_the_deltas_of_the_top_foreground_class():
    """As CutLER, the box whose IoU decides is the RoI regressed with the deltas of its highest-scoring
    foreground class (class 2 here, though the background scores higher); class-agnostic deltas are one box."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    logits = torch.tensor([[5.0, 1.0, 3.0]])
    deltas = torch.zeros(1, 12)
    deltas[0, 4] = -1.0  # class 1: 1 px left (dx = delta / 10, times the 10 px width)
    deltas[0, 8] = 1.0  # class 2: 1 px right
    (box,) = predicted_boxes(logits, deltas, proposals, coder)
    assert torch.allclose(box, torch.tensor([[1.0, 0.0, 11.0, 10.0]]))
    (agnostic,) = predicted_boxes(logits, deltas[:, 8:], proposals, coder)
    assert torch.allclose(agnostic, torch.tensor([[1.0, 0.0, 11.0, 10.0]]))


def test_fast_rcnn_loss_equals_torchvisions_and_weights_only_the_classification():
    torch.manual_seed(0)
    logits, deltas = torch.randn(6, 3), torch.randn(6, 12)
    labels, targets = [torch.tensor([1, 0, 2]), torch.tensor([0, 0, 2])], [torch.randn(3, 4), torch.randn(3, 4)]
    ours, theirs = fast_rcnn_loss(logits, deltas, labels, targets), fastrcnn_loss(logits, deltas, labels, targets)
    assert torch.allclose(ours[0], theirs[0]) and torch.allclose(ours[1], theirs[1])
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    cls, box = fast_rcnn_loss(logits, deltas, labels, targets, weights)
    per_roi = torch.nn.functional.cross_entropy(logits, torch.cat(labels), reduction="none")
    assert torch.allclose(cls, (per_roi * weights).sum() / 6)
    assert torch.allclose(box, theirs[1])
    # class-agnostic regression: one (N, 4) box for every class
    agnostic = fast_rcnn_loss(logits, deltas[:, :4], labels, targets)[1]
    pos = torch.tensor([0, 2, 5])
    expected = torch.nn.functional.smooth_l1_loss(deltas[pos, :4], torch.cat(targets)[pos], beta=1 / 9,
                                                  reduction="sum") / 6
    assert torch.allclose(agnostic, expected)


def _box_loss(droploss: bool, with_unlabelled_roi: bool, roi_heads: str = "standard",
              droploss_iou: float | None = None) -> torch.Tensor:
    """Sum over sampled RoIs of the classification loss, for one image whose pseudo-labels miss an object."""
    overrides = [f"model.droploss={str(droploss).lower()}", f"model.roi_heads={roi_heads}"]
    overrides += [] if droploss_iou is None else [f"model.droploss_iou={droploss_iou}"]
    cfg = load_config(TINY, overrides, DEFAULTS)
    torch.manual_seed(0)
    model = build_model(cfg, 1)
    heads = model.roi_heads
    predictors = heads.box_predictor if roi_heads == "cascade" else [heads.box_predictor]
    with torch.no_grad():
        for predictor in predictors:  # predicted boxes = the RoIs, so the IoUs are the hand-made ones
            predictor.bbox_pred.weight.zero_()
            predictor.bbox_pred.bias.zero_()
    model.train()
    torch.manual_seed(1)
    image = torch.rand(1, 3, 64, 64)
    features = model.backbone(image)
    proposals = [torch.tensor([LABELLED, [10.0, 9.0, 29.0, 27.0]] + ([UNLABELLED] if with_unlabelled_roi else []))]
    targets = [{"boxes": torch.tensor([LABELLED]), "labels": torch.tensor([1]),
                "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}]
    _, losses, sampled = heads.forward_box(features, proposals, [(64, 64)], targets)
    num_rois = len(sampled[2][0])  # every RoI is sampled: 3 or 4 (the GT box is added)
    assert num_rois == 3 + with_unlabelled_roi
    key = "loss_classifier" if roi_heads == "standard" else "loss_classifier_stage0"
    return losses[key] * num_rois


@pytest.mark.parametrize("roi_heads", ["standard", "cascade"])
def test_unlabelled_object_costs_no_loss_with_droploss_only(roi_heads, one_thread):
    without_roi = _box_loss(True, with_unlabelled_roi=False, roi_heads=roi_heads)
    with_roi = _box_loss(True, with_unlabelled_roi=True, roi_heads=roi_heads)
    assert torch.allclose(with_roi, without_roi, rtol=1e-6, atol=0)  # the RoI on the missed object adds nothing
    plain_without = _box_loss(False, with_unlabelled_roi=False, roi_heads=roi_heads)
    plain_with = _box_loss(False, with_unlabelled_roi=True, roi_heads=roi_heads)
    assert torch.allclose(plain_without, without_roi, rtol=1e-6, atol=0)  # nothing is dropped near the object
    assert plain_with - plain_without > 0.1  # without DropLoss the missed object is punished as background


def test_droploss_iou_zero_still_drops_the_roi_on_the_missed_object(one_thread):
    """`model.droploss_iou: 0`, which the schema allows, keeps DropLoss on: a RoI of IoU 0 is dropped (0 <= 0)."""
    without_roi = _box_loss(True, with_unlabelled_roi=False, droploss_iou=0.0)
    with_roi = _box_loss(True, with_unlabelled_roi=True, droploss_iou=0.0)
    assert torch.allclose(with_roi, without_roi, rtol=1e-6, atol=0)
