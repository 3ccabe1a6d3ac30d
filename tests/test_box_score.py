"""model.box_score "object": a detection's score is its probability of being any object (1 - p(background)),
once per proposal, with NMS over all classes; "class" stays torchvision's per-class scoring."""
from __future__ import annotations

import pytest
import torch

from detectron2_train.engine import DEFAULTS, SCHEMA
from detectron2_train.modeling import build_model
from detectron2_train.roi_heads import object_detections
from tests.test_maskrcnn_configs import TINY_MODEL
from utils.config import load_config
from utils.errors import UserError

SHAPE = (100, 100)


def test_an_object_unsure_of_its_pseudo_class_outranks_a_confident_part():
    whole, part = [10.0, 10.0, 90.0, 90.0], [10.0, 10.0, 30.0, 30.0]
    boxes = torch.tensor([whole, part])
    # the whole pet: 0.9 object, split over 3 clusters; its head: 0.6 object, all one cluster
    scores = torch.tensor([[0.1, 0.35, 0.3, 0.25], [0.4, 0.6, 0.0, 0.0]])
    result = object_detections(boxes, scores, SHAPE, 0.05, 0.5, 10)
    assert result["boxes"].tolist() == [whole, part]
    assert result["scores"].tolist() == pytest.approx([0.9, 0.6]) and result["labels"].tolist() == [1, 1]
    # torchvision's per-class scores rank the part first: its 0.6 against the whole's best class, 0.35
    assert scores[1, 1:].max() > scores[0, 1:].max()


def test_one_detection_per_proposal_with_the_box_of_its_most_probable_class():
    per_class = torch.tensor([[[0, 0, 1, 1], [0, 0, 50, 50], [20, 20, 60, 60]]], dtype=torch.float)  # (1, K, 4)
    scores = torch.tensor([[0.2, 0.3, 0.5]])
    result = object_detections(per_class, scores, SHAPE, 0.05, 0.5, 10)
    assert result["boxes"].tolist() == [[20, 20, 60, 60]] and result["labels"].tolist() == [2]
    assert result["scores"].tolist() == pytest.approx([0.8])


def test_nms_runs_over_all_classes_and_the_threshold_and_top_k_apply():
    boxes = torch.tensor([[10, 10, 50, 50], [11, 11, 51, 51], [60, 60, 90, 90], [0, 0, 5, 5]], dtype=torch.float)
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.0, 0.8], [0.3, 0.0, 0.7], [0.97, 0.03, 0.0]])
    result = object_detections(boxes, scores, SHAPE, 0.05, 0.5, 10)
    # the second box overlaps the first (IoU 0.9) although its class differs: suppressed; the last is below 0.05
    assert result["boxes"].tolist() == [[10, 10, 50, 50], [60, 60, 90, 90]]
    assert object_detections(boxes, scores, SHAPE, 0.05, 0.5, 1)["boxes"].tolist() == [[10, 10, 50, 50]]


@pytest.mark.parametrize("roi_heads", ["standard", "cascade"])
def test_the_key_reaches_every_head_and_only_takes_its_choices(roi_heads, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  box_score: object\n")
    cfg = load_config(str(config), [f"model.roi_heads={roi_heads}", *TINY_MODEL], SCHEMA)
    model = build_model(cfg, num_classes=3)
    assert model.roi_heads.box_score == "object"
    assert DEFAULTS["model"]["box_score"] == "class"
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])[0]
    assert set(out) >= {"boxes", "scores", "labels", "masks"}
    assert bool((out["scores"] <= 1).all()) and bool((out["labels"] >= 1).all())
    config.write_text("model:\n  box_score: objectness\n")
    with pytest.raises(UserError, match="box_score"):
        load_config(str(config), [], SCHEMA)
