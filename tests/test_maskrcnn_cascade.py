"""Cascade Mask R-CNN heads: stage labels at rising IoUs, gradient scaling, score averaging, training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from detectron2_train.cascade import AgnosticBoxPredictor, CascadeRoIHeads
from detectron2_train.engine import DEFAULTS, train
from detectron2_train.modeling import build_model
from tests.helpers.synthetic_shapes import make_dataset
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "tiny_test.yaml"


def cascade_model(*overrides: str, num_classes: int = 2):
    torch.manual_seed(0)
    return build_model(load_config(TINY, ["model.roi_heads=cascade", *overrides], DEFAULTS), num_classes)


def test_structure_three_stages_with_rising_ious_and_coder_weights():
    heads = cascade_model().roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.num_stages == 3
    assert heads.stage_ious == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.stage_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert heads.box_coder is heads.stage_coders[0] and heads.proposal_matcher is heads.stage_matchers[0]
    assert all(isinstance(p, AgnosticBoxPredictor) and p.bbox_pred.out_features == 4 for p in heads.box_predictor)
    assert heads.box_head[0] is not heads.box_head[1]
    with pytest.raises(UserError, match="class-agnostically"):
        cascade_model("model.mask_head=transfer")  # default input cls+box reads class-specific box weights
    transfer = cascade_model("model.mask_head=transfer", "model.transfer.input=cls").roi_heads
    assert transfer.class_box_predictor() is transfer.box_predictor[-1]  # T reads the last stage's classifier


def test_each_stage_labels_at_its_own_iou():
    heads = cascade_model().roi_heads
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    # IoUs 0.55, 0.65, 0.75, 0.3 with the GT box (boxes [0, 0, w, 100] have IoU w / 100)
    proposals = [torch.tensor([[0.0, 0.0, 55.0, 100.0], [0.0, 0.0, 65.0, 100.0],
                               [0.0, 0.0, 75.0, 100.0], [0.0, 0.0, 30.0, 100.0]])]
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    expected = {0: [2, 2, 2, 0], 1: [0, 2, 2, 0], 2: [0, 0, 2, 0]}
    for stage, labels in expected.items():
        got, regression = heads.label_stage(proposals, targets, stage)
        assert got[0].tolist() == labels
        coder = heads.stage_coders[stage]
        assert torch.allclose(regression[0], coder.encode_single(gt.expand(4, 4), proposals[0]))
    empty = heads.label_stage(proposals, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}], 1)
    assert empty[0][0].tolist() == [0, 0, 0, 0] and not empty[1][0].any()


def test_stage_gradient_on_shared_features_is_divided_by_the_number_of_stages():
    heads = cascade_model().roi_heads
    torch.manual_seed(1)
    features = {k: torch.randn(1, 32, s, s, requires_grad=True) for k, s in (("0", 16), ("1", 8), ("2", 4), ("3", 2))}
    proposals = [torch.tensor([[2.0, 2.0, 30.0, 40.0], [10.0, 5.0, 50.0, 60.0]])]

    def feature_grad(training: bool) -> torch.Tensor:
        heads.train(training)
        logits, deltas = heads.run_stage(features, proposals, [(64, 64)], 1)
        return torch.autograd.grad(logits.sum() + deltas.sum(), features["0"])[0]

    assert torch.allclose(feature_grad(True) * 3, feature_grad(False), rtol=1e-5, atol=1e-7)


def test_detections_average_stage_scores_and_use_the_last_stage_boxes():
    heads = cascade_model().roi_heads
    heads.eval()
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.3, 0.5, 10
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [30.0, 30.0, 50.0, 70.0]])]
    scores = [torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.15, 0.45, 0.4]])]
    out = heads.detections(boxes, scores, [(64, 64)])[0]
    # box 1 loses to box 0 in class 1's NMS; box 2 is kept for classes 1 and 2 (> 0.3); sorted by score
    assert out["labels"].tolist() == [1, 1, 2] and out["scores"].tolist() == pytest.approx([0.8, 0.45, 0.4])
    assert out["boxes"].tolist() == [[0, 0, 10, 10], [30, 30, 50, 64], [30, 30, 50, 64]]  # clipped to the image

    # forward_box at test time = mean of the stages' softmax scores, boxes regressed by the last stage
    torch.manual_seed(2)
    features = {k: torch.randn(1, 32, s, s) for k, s in (("0", 16), ("1", 8), ("2", 4), ("3", 2))}
    proposals = [torch.tensor([[2.0, 2.0, 30.0, 40.0], [10.0, 5.0, 50.0, 60.0], [0.0, 0.0, 64.0, 64.0]])]
    heads.score_thresh = 0.0
    with torch.no_grad():
        props, probs = proposals, []
        for stage in range(3):
            logits, deltas = heads.run_stage(features, props, [(64, 64)], stage)
            probs.append(F.softmax(logits, -1))
            props = heads.next_proposals([heads.stage_coders[stage].decode(deltas, props)[:, 0]], [(64, 64)])
        expected = heads.detections(props, [sum(probs) / 3], [(64, 64)])[0]
        got = heads.forward_box(features, proposals, [(64, 64)])[0][0]
    for key in ("boxes", "labels", "scores"):
        assert torch.allclose(got[key].float(), expected[key].float()), key


def test_cascade_mask_rcnn_trains_with_masks_and_droploss(tmp_path, one_thread):
    data = make_dataset(tmp_path / "syn", num_images=3, seed=6)
    cfg = load_config(TINY, ["model.roi_heads=cascade", "model.droploss=true", "model.mask_head=agnostic"], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"].update(train_json=str(data), train_root=str(data.parent / "images"), num_workers=0)
    cfg["solver"].update(max_iter=2, warmup_iters=1, checkpoint_period=100, log_period=1)
    state = torch.load(train(cfg, DistInfo()), weights_only=False)
    assert any(k.startswith("roi_heads.box_head.2.") for k in state["model"])
    model = build_model(cfg, 2)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])[0]
    assert out["masks"].shape[1:] == (1, 64, 64) and len(out["boxes"]) == len(out["scores"])
