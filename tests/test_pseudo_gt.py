"""GGN's training set (detectron2_train/pseudo_gt.py): pseudo-masks kept below IoU 0.5 with every annotated
object, the top-K by score after that filter, the seen classes' annotations, and train_net.py training on it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detectron2_train import train_net
from detectron2_train.pseudo_gt import TRAINING_SET, merge_pseudo_gt, select_pseudo_masks, training_json
from tests.helpers.synthetic_shapes import make_dataset
from utils.coco_io import decode_segmentation, make_annotation, mask_to_polygons
from utils.distributed import DistInfo
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
H, W = 10, 20


def box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def pseudo(mask: np.ndarray, score: float, image_id: int = 1) -> dict:
    return make_annotation(mask, image_id, 1, score)


# The annotated object: a 5 x 5 square (25 pixels) in the top-left corner.
OBJECT = box(slice(0, 5), slice(0, 5))
HALF = box(slice(0, 5), slice(0, 10))  # holds the object: IoU 25 / 50 = 0.5 exactly -> dropped
JUST_BELOW = HALF.copy()
JUST_BELOW[5, 0] = 1  # IoU 25 / 51 < 0.5 -> kept
ELSEWHERE = [box(slice(6, 10), slice(10 + 2 * k, 12 + 2 * k)) for k in range(4)]  # IoU 0


def test_a_pseudo_mask_is_kept_below_half_iou_and_topk_counts_after_the_filter():
    annotated = [make_annotation(OBJECT, 1, 18)]
    candidates = [pseudo(OBJECT, 0.99), pseudo(HALF, 0.98), pseudo(JUST_BELOW, 0.5), pseudo(ELSEWHERE[0], 0.7),
                  pseudo(ELSEWHERE[1], 0.6), pseudo(ELSEWHERE[2], 0.2)]
    kept = select_pseudo_masks(candidates, annotated, H, W, topk=3)
    assert [a["score"] for a in kept] == [0.7, 0.6, 0.5]  # the three best of those below IoU 0.5
    assert select_pseudo_masks(candidates, annotated, H, W, topk=10) == [candidates[i] for i in (3, 4, 2, 5)]
    assert select_pseudo_masks(candidates, annotated, H, W, topk=1) == [candidates[3]]
    # another threshold moves the boundary: at 0.51 the exact-half mask stays
    assert [a["score"] for a in select_pseudo_masks(candidates, annotated, H, W, 10, iou_thresh=0.51)] == [
        0.98, 0.7, 0.6, 0.5, 0.2]
    # no annotated object: the top-K by score; equal scores keep their order
    tied = [pseudo(ELSEWHERE[k], 0.5) for k in range(4)]
    assert select_pseudo_masks(tied, [], H, W, topk=2) == tied[:2]
    # a crowd region counts by the share of the pseudo-mask it covers: HALF lies half in this crowd
    crowd = {**make_annotation(box(slice(0, 5), slice(5, 20)), 1, 1), "iscrowd": 1}
    assert select_pseudo_masks([pseudo(HALF, 0.9), pseudo(ELSEWHERE[0], 0.8)], [crowd], H, W, 5)[0]["score"] == 0.8


def test_merge_keeps_the_seen_classes_and_adds_pseudo_masks_in_one_category():
    dataset = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                          {"id": 2, "file_name": "b.png", "height": H, "width": W}],
               "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
               "annotations": [{**make_annotation(OBJECT, 1, 1, ann_id=7), "segmentation": mask_to_polygons(OBJECT)},
                               make_annotation(ELSEWHERE[0], 1, 18, ann_id=9)]}
    anns = [pseudo(OBJECT, 0.9), pseudo(ELSEWHERE[0], 0.8)]  # image 1: the person again, the unseen dog
    anns += [pseudo(m, s, image_id=2) for m, s in zip(ELSEWHERE, (0.1, 0.4, 0.3, 0.2))]
    merged = merge_pseudo_gt(dataset, anns, topk=3, seen_category_ids=[1])
    assert merged["images"] == dataset["images"] and merged["categories"] == [
        {"id": 1, "name": "object", "supercategory": "object"}]
    assert [(a["id"], a["image_id"], a.get("pseudo", 0), a.get("score")) for a in merged["annotations"]] == [
        (7, 1, 0, 1.0), (10, 1, 1, 0.8), (11, 2, 1, 0.4), (12, 2, 1, 0.3), (13, 2, 1, 0.2)]
    assert all(a["category_id"] == 1 and a["iscrowd"] == 0 for a in merged["annotations"])
    dog = decode_segmentation(merged["annotations"][1]["segmentation"], H, W)
    assert np.array_equal(dog, ELSEWHERE[0])
    assert merged["info"]["annotated"] == 1 and merged["info"]["pseudo_masks"] == 4
    # with every class annotated, the dog's pseudo-mask duplicates an annotation and goes
    every = merge_pseudo_gt(dataset, anns, topk=3)
    assert [(a["id"], a.get("pseudo", 0)) for a in every["annotations"]] == [(7, 0), (9, 0), (10, 1), (11, 1), (12, 1)]


def _config(tmp_path: Path, data: Path, *flags: str) -> dict:
    args = train_net.parse_args(["--config", str(REPO / "configs" / "detectron2" / "tiny_test.yaml"), "--output_dir",
                                 str(tmp_path / "out"), "--train_json", str(data), "--train_root",
                                 str(data.parent / "images"), *flags])
    return train_net.config_from_args(args)


def test_train_net_trains_on_the_merged_set_and_records_it(tmp_path, one_thread):
    data = make_dataset(tmp_path / "syn", num_images=3, seed=5)
    gt = json.loads(data.read_text())
    (tmp_path / "A.txt").write_text("1\n")
    masks = [decode_segmentation(a["segmentation"], 64, 64) for a in gt["annotations"]]
    background = 1 - np.max(masks, axis=0) if masks else np.ones((64, 64), np.uint8)
    results = [make_annotation(background * box_mask, image["id"], 1, 0.9)
               for image in gt["images"] for box_mask in [np.pad(np.ones((8, 8), np.uint8), ((0, 56), (0, 56)))]]
    results = [r for r in results if r["area"] > 0]
    (tmp_path / "pa.json").write_text(json.dumps(results))
    flags = ["--class_agnostic", "--seen_classes", str(tmp_path / "A.txt"), "--pseudo_json", str(tmp_path / "pa.json"),
             "--pseudo_topk", "2", "--set", "solver.max_iter=1", "solver.ims_per_batch=1"]
    cfg = _config(tmp_path, data, *flags)
    assert cfg["data"]["pseudo_topk"] == 2 and cfg["data"]["seen_classes"] == str(tmp_path / "A.txt")
    train_net.main([*map(str, ["--config", REPO / "configs" / "detectron2" / "tiny_test.yaml", "--output_dir",
                               tmp_path / "out", "--train_json", data, "--train_root", data.parent / "images",
                               "--device", "cpu", *flags])])
    merged = json.loads((tmp_path / "out" / TRAINING_SET).read_text())
    seen = [a for a in gt["annotations"] if a["category_id"] == 1]
    assert len(merged["annotations"]) == len(seen) + len(results)
    assert merged["info"]["pseudo_masks"] == len(results) > 0
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)
    recorded = state["fingerprint"]
    assert recorded["settings"]["data.pseudo_topk"] == 2
    assert set(recorded["files"]) >= {"data.pseudo_json", "data.seen_classes", "data.train_json"}
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["data"]["pseudo_json"] == str(tmp_path / "pa.json")


def test_pseudo_gt_needs_class_agnostic_training_and_known_images(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=2, seed=6)
    (tmp_path / "pa.json").write_text(json.dumps([make_annotation(np.ones((64, 64), np.uint8), 99, 1, 0.5)]))
    cfg = _config(tmp_path, data, "--pseudo_json", str(tmp_path / "pa.json"))
    with pytest.raises(UserError, match="class-agnostic training set: set data.class_agnostic"):
        training_json(cfg, DistInfo())
    cfg["data"]["class_agnostic"] = True
    with pytest.raises(UserError, match=r"pa.json: annotation #0 has image_id 99 which is not in .*annotations.json"):
        training_json(cfg, DistInfo())
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="data.pseudo_topk must be >= 1"):
        _config(tmp_path, data, "--set", "data.pseudo_topk=0")
    cfg = _config(tmp_path, data)  # neither key: the training JSON as it is
    assert training_json(cfg, DistInfo()) == str(data)
