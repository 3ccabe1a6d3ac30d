"""Inference to COCO results (category ids mapped back), self-training pseudo-labels, datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detectron2_train.data import CocoInstances
from detectron2_train.engine import DEFAULTS, run
from detectron2_train.pseudo_labels import filter_predictions, pseudo_label_dataset, write_pseudo_labels
from tests.helpers.synthetic_shapes import make_dataset
from utils.coco_io import load_json, make_annotation, write_json
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError

TINY = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "tiny_test.yaml"


def _pred(image_id, score, x=0, size=8):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[2:2 + size, x:x + size] = 1
    return make_annotation(mask, image_id, 1, score)


def test_filter_keeps_confident_or_single_best():
    preds = [_pred(1, 0.9), _pred(1, 0.8, x=10), _pred(1, 0.3, x=20), _pred(2, 0.4), _pred(2, 0.6, x=10)]
    kept = filter_predictions(preds, 0.7)
    assert sorted((p["image_id"], p["score"]) for p in kept) == [(1, 0.8), (1, 0.9), (2, 0.6)]
    assert len(filter_predictions(preds, 0.0)) == 5


def test_pseudo_label_dataset(tmp_path):
    images = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2, 3)],
              "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    write_json(tmp_path / "images.json", images)
    empty = _pred(2, 0.99, size=0)  # an empty mask is never a pseudo-label
    write_json(tmp_path / "results.json", [_pred(1, 0.9), _pred(1, 0.2, x=10), _pred(2, 0.3), empty])
    out = tmp_path / "pseudo.json"
    dataset = write_pseudo_labels(tmp_path / "results.json", tmp_path / "images.json", 0.5, out)
    assert load_json(out) == dataset
    anns = dataset["annotations"]
    assert [(a["image_id"], a["score"]) for a in anns] == [(1, 0.9), (2, 0.3)]
    assert [a["id"] for a in anns] == [1, 2] and all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    assert anns[0]["bbox"] == [0.0, 2.0, 8.0, 8.0] and anns[0]["area"] == 64.0
    assert len(dataset["images"]) == 3  # image 3 (no prediction) stays as a negative
    write_json(tmp_path / "bad.json", [_pred(7, 0.9)])
    with pytest.raises(UserError, match="image_id 7"):
        pseudo_label_dataset(tmp_path / "bad.json", tmp_path / "images.json", 0.5)
    with pytest.raises(UserError, match="score_thresh"):
        pseudo_label_dataset(tmp_path / "results.json", tmp_path / "images.json", 1.5)


def test_dataset_targets_skip_crowd_and_keep_empty_images(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=2, seed=5, empty_images=1)
    coco = load_json(data)
    crowd = dict(coco["annotations"][0], id=99, iscrowd=1)
    coco["annotations"].append(crowd)
    coco["categories"] = [{"id": 9, "name": "ellipse"}, {"id": 1, "name": "rectangle"}]
    for a in coco["annotations"]:
        a["category_id"] = 9 if a["category_id"] == 2 else 1
    write_json(data, coco)
    ds = CocoInstances(data, data.parent / "images", flip_prob=1.0)
    assert [c["id"] for c in ds.categories] == [1, 9]
    image, target = ds[0]
    n0 = sum(1 for a in coco["annotations"] if a["image_id"] == 1 and not a.get("iscrowd"))
    assert image.shape == (3, 64, 64) and target["boxes"].shape == (n0, 4) and target["masks"].shape == (n0, 64, 64)
    assert set(target["labels"].tolist()) <= {1, 2}
    # the flip moves boxes and masks together
    _, flipped = ds[(0, 0)]
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert torch.allclose(flipped["boxes"][:, 0], 64 - target["boxes"][:, 2])
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)
    agnostic = CocoInstances(data, data.parent / "images", class_agnostic=True)
    assert agnostic.categories == [{"id": 1, "name": "object"}] and set(agnostic[0][1]["labels"].tolist()) == {1}


def test_train_infer_and_self_train_round(tmp_path):
    """A short run writes pycocotools-ready results with the dataset's category ids; they seed round 2."""
    data = make_dataset(tmp_path / "syn", num_images=3, seed=6)
    coco = load_json(data)
    for a in coco["annotations"]:
        a["category_id"] = {1: 5, 2: 9}[a["category_id"]]
    coco["categories"] = [{"id": 5, "name": "rectangle"}, {"id": 9, "name": "ellipse"}]
    write_json(data, coco)
    overrides = ["solver.max_iter=2", "model.box_score_thresh=0.0", "model.detections_per_img=5"]
    cfg = load_config(TINY, overrides, DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "round1")
    cfg["data"].update(train_json=str(data), train_root=str(data.parent / "images"),
                       test_json=str(data), test_root=str(data.parent / "images"))
    run(cfg, DistInfo())
    results_path = tmp_path / "round1" / "inference" / "results.json"
    results = load_json(results_path)
    assert results and {r["category_id"] for r in results} <= {5, 9}
    assert all(isinstance(r["segmentation"]["counts"], str) and len(r["bbox"]) == 4 for r in results)
    assert (tmp_path / "round1" / "inference" / "coco_eval.json").is_file()
    from pycocotools.coco import COCO
    gt = COCO(str(data))
    gt.loadRes(str(results_path))

    cfg2 = json.loads(json.dumps(cfg))
    cfg2["output_dir"] = str(tmp_path / "round2")
    cfg2["data"]["test_json"] = None
    run(cfg2, DistInfo(), pseudo_from=str(results_path), score_thresh=0.99)
    pseudo = load_json(tmp_path / "round2" / "pseudo_labels.json")
    nonempty_images = {r["image_id"] for r in results if r["area"] > 0}
    assert {a["image_id"] for a in pseudo["annotations"]} == nonempty_images
    assert (tmp_path / "round2" / "model_final.pth").is_file()
    cfg_saved = (tmp_path / "round2" / "config.yaml").read_text()
    assert "pseudo_labels.json" in cfg_saved


def test_self_training_rounds_skip_finished_rounds_and_refuse_changed_ones(tmp_path):
    """Two rounds: round 2 trains on round 1's predictions on the training images; a rerun trains
    nothing; another threshold for round 2 is refused; train_net.py's flags give per-round settings."""
    from detectron2_train.self_training import RoundSettings, self_training_rounds
    from detectron2_train.train_net import parse_args, round_settings

    data = make_dataset(tmp_path / "syn", num_images=3, seed=6)
    cfg = load_config(TINY, ["solver.max_iter=2", "model.box_score_thresh=0.0", "model.detections_per_img=5"],
                      DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "st")
    cfg["data"].update(train_json=str(data), train_root=str(data.parent / "images"), test_json=str(data),
                       test_root=str(data.parent / "images"), class_agnostic=True)
    rounds = [RoundSettings(), RoundSettings(score_thresh=0.5)]
    done = self_training_rounds(cfg, DistInfo(), rounds)
    round1, round2 = tmp_path / "st" / "round1", tmp_path / "st" / "round2"
    assert [r.result["checkpoint"] for r in done] == [str(round1 / "model_final.pth"), str(round2 / "model_final.pth")]
    predictions = load_json(round1 / "train_results.json")
    pseudo = load_json(round2 / "pseudo_labels.json")
    assert pseudo["annotations"] == pseudo_label_dataset(round1 / "train_results.json", data, 0.5)["annotations"]
    assert {a["image_id"] for a in pseudo["annotations"]} == {p["image_id"] for p in predictions if p["area"] > 0}
    # The test set lists the training images: their predictions are evaluated, not predicted twice.
    assert done[1].result["test_results"] == str(round2 / "train_results.json")
    assert not (round2 / "inference").exists()
    report = load_json(round2 / "eval.json")
    assert set(report["metrics"]) == {"bbox", "segm"}
    stamp = (round2 / "model_final.pth").stat().st_mtime_ns
    assert [r.result for r in self_training_rounds(cfg, DistInfo(), rounds)] == [r.result for r in done]
    assert (round2 / "model_final.pth").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"round 2 in .*round2: it was made with self_training\.score_thresh=0\.5, "
                                        r"not 0\.9; use the same settings, or --overwrite to run it again"):
        self_training_rounds(cfg, DistInfo(), [RoundSettings(), RoundSettings(score_thresh=0.9)])

    args = parse_args(["--config", str(TINY), "--rounds", "3", "--score_thresh", "0.6", "0.8",
                       "--round_set", "3:solver.max_iter=5", "2:solver.base_lr=0.01"])
    assert round_settings(args) == [RoundSettings(0.6), RoundSettings(0.6, ("solver.base_lr=0.01",)),
                                    RoundSettings(0.8, ("solver.max_iter=5",))]
    with pytest.raises(UserError, match=r"--round_set '4:solver.max_iter=5' must look like N:KEY=VALUE with N in 1\.\.3"):
        round_settings(parse_args(["--config", str(TINY), "--rounds", "3", "--round_set", "4:solver.max_iter=5"]))
