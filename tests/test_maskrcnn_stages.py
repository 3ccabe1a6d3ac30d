"""MaskX R-CNN stage-wise training: stage `box` trains Faster R-CNN, stage `mask` only the mask branch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2_train.engine import DEFAULTS, run_inference, seed_all, train
from detectron2_train.modeling import BOX_DETECTOR, MASK_BRANCH, build_model
from tests.helpers.synthetic_shapes import make_dataset
from evaluation.coco_eval import EvalOptions, evaluate_predictions
from utils.coco_io import decode_segmentation, load_json
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "tiny_test.yaml"


def stage_cfg(tmp_path: Path, data: Path, name: str, stage: str, mask_head: str, **solver) -> dict:
    cfg = load_config(TINY, [f"model.stage={stage}", f"model.mask_head={mask_head}"], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / name)
    cfg["data"].update(train_json=str(data), train_root=str(data.parent / "images"), num_workers=0)
    (tmp_path / "A.txt").write_text("rectangle\n")
    cfg["data"]["mask_classes"] = str(tmp_path / "A.txt")
    cfg["solver"].update(solver)
    return cfg


def _is_detector(key: str) -> bool:
    return key.startswith(tuple(prefix + "." for prefix in BOX_DETECTOR))


def test_stage_mask_leaves_the_detector_bit_identical(tmp_path, one_thread):
    data = make_dataset(tmp_path / "syn", num_images=4, seed=5)
    short = dict(max_iter=3, warmup_iters=1, steps=[10], checkpoint_period=100, log_period=1)
    box = stage_cfg(tmp_path, data, "box", "box", "agnostic", **short)
    box["model"]["norm"] = "bn"  # BatchNorm statistics: buffers that move in training mode
    seed_all(0)
    initial = build_model(box, 2, [1]).state_dict()
    box_final = torch.load(train(box, DistInfo()), weights_only=False)["model"]
    records = [json.loads(line) for line in (tmp_path / "box" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("loss_mask" not in r and "loss_classifier" in r for r in records)
    for key, value in initial.items():
        if key.startswith(MASK_BRANCH):
            assert torch.equal(box_final[key], value), key  # stage box leaves the mask branch alone
    moved = [k for k in initial if _is_detector(k) and not torch.equal(initial[k], box_final[k])]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("weight") for k in moved)

    # stage mask: another mask head than the box stage had (its mask branch is not loaded, the rest is)
    mask = stage_cfg(tmp_path, data, "mask", "mask", "transfer", **short)
    mask["model"]["norm"] = "bn"
    with pytest.raises(UserError, match="pass --weights"):
        train(mask, DistInfo())
    mask_final = torch.load(train(mask, DistInfo(), init_weights=str(tmp_path / "box" / "model_final.pth")),
                            weights_only=False)["model"]
    detector_keys = [k for k in mask_final if _is_detector(k)]
    assert len(detector_keys) > 40 and any(k.endswith("running_var") for k in detector_keys)
    for key in detector_keys:
        assert torch.equal(mask_final[key], box_final[key]), key
    seed_all(0)
    mask_initial = build_model(mask, 2, [1]).state_dict()
    trained = [k for k in mask_final if k.startswith(MASK_BRANCH) and not torch.equal(mask_final[k], mask_initial[k])]
    assert any("weight_transfer" in k for k in trained) and any("mask_head" in k for k in trained)
    records = [json.loads(line) for line in (tmp_path / "mask" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_mask"] > 0 for r in records)


def test_frozen_parts_stay_in_eval_mode_and_out_of_the_optimizer():
    cfg = load_config(TINY, ["model.stage=mask", "model.norm=bn"], DEFAULTS)
    model = build_model(cfg, 2)
    model.train()
    assert not model.backbone.training and not model.roi_heads.box_head.training and not model.rpn.head.training
    assert model.rpn.training and model.roi_heads.mask_head.training  # training-time proposals, trained masks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(MASK_BRANCH) for n in trainable)
    model.eval()
    assert not model.rpn.training
    box = build_model(load_config(TINY, ["model.stage=box"], DEFAULTS), 2)
    box.train()
    assert not box.roi_heads.mask_head.training and box.backbone.training
    assert not any(p.requires_grad for n, p in box.named_parameters() if n.startswith(MASK_BRANCH))


@pytest.mark.slow
def test_stage_wise_training_learns_set_b_masks(tmp_path, one_thread):
    """Faster R-CNN on rectangles + ellipses, then the transfer mask branch on rectangle masks only."""
    data = make_dataset(tmp_path / "syn", num_images=6, seed=1, empty_images=1)
    box = stage_cfg(tmp_path, data, "box", "box", "transfer", max_iter=150, steps=[130], checkpoint_period=1000,
                    log_period=10)
    train(box, DistInfo())
    mask = stage_cfg(tmp_path, data, "mask", "mask", "transfer", max_iter=50, steps=[40], warmup_iters=5,
                     checkpoint_period=1000, log_period=10)
    final = train(mask, DistInfo(), init_weights=str(tmp_path / "box" / "model_final.pth"))

    results = run_inference(mask, DistInfo(), str(final), str(data), str(data.parent / "images"),
                            tmp_path / "results.json")
    gt = load_json(data)
    ious = []
    for ann in (a for a in gt["annotations"] if a["category_id"] == 2):  # ellipses: set B, never a mask loss
        preds = [r for r in results if r["image_id"] == ann["image_id"] and r["category_id"] == 2 and r["score"] > 0.5]
        assert preds, f"ellipse {ann['id']} not detected"
        gm = decode_segmentation(ann["segmentation"], 64, 64).astype(bool)
        pm = [decode_segmentation(p["segmentation"], 64, 64).astype(bool) for p in preds]
        ious.append(max((m & gm).sum() / (m | gm).sum() for m in pm))
    assert ious and np.mean(ious) > 0.5, ious
    report = evaluate_predictions(results, gt, EvalOptions(iou_types=("segm",), eval_classes=("ellipse",)),
                                  agnostic_recall=False)
    assert report.metrics["segm"]["AP50"] > 50, report.metrics["segm"]
