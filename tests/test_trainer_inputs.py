"""Trainer and evaluator inputs refused before any work (issue 20, section 4): each bad input is one `error:`
line, exit 2, and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import eval_instances
import gen_pa_masks
from detectron2_train import make_split, train_net
from tests.cli_helpers import error_line, run_main
from tests.helpers.synthetic_shapes import make_dataset
from utils.coco_io import make_annotation, mask_to_rle

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "detectron2" / "tiny_test.yaml"


def refused(main, argv: list[str], tmp_path: Path, before: set[str]) -> str:
    """Run `main(argv)`: exit 2, one error line, and no new file under tmp_path; returns the error line."""
    code, _, err = run_main(main, argv)
    assert code == 2, err
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("error:")]) == 1, err
    assert {str(p) for p in tmp_path.rglob("*")} == before
    return error_line(err)


def files(tmp_path: Path) -> set[str]:
    return {str(p) for p in tmp_path.rglob("*")}


def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    data = make_dataset(tmp_path / "syn", num_images=2, seed=4)
    return data, data.parent / "images"


def train_args(tmp_path: Path, data: Path, images: Path, *extra: str) -> list[str]:
    # 2 iterations: a run that is not refused ends in seconds (and writes files, which the tests see)
    return ["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--train_json", str(data), "--train_root", str(images), "--set", "solver.max_iter=2",
            "solver.warmup_iters=1", "solver.steps=[1]", "solver.ims_per_batch=2", *extra]


def test_round_set_goes_through_the_config_schema(tmp_path):
    data, images = synthetic(tmp_path)
    before = files(tmp_path)
    base = train_args(tmp_path, data, images, "--rounds", "2")
    line = refused(train_net.main, [*base, "--round_set", "1:solver.max_itr=50"], tmp_path, before)
    assert line == ("error: --round_set 1:solver.max_itr=50: unknown config key 'solver.max_itr' "
                    "(did you mean 'solver.max_iter'?)")
    line = refused(train_net.main, [*base, "--round_set", "2:solver.base_lr=-5"], tmp_path, before)
    assert line == "error: --round_set 2:solver.base_lr=-5: solver.base_lr must be > 0, got -5.0"
    line = refused(train_net.main, [*base, "--round_set", "2:solver"], tmp_path, before)
    assert line == ("error: --round_set '2:solver' must look like N:KEY=VALUE with N in 1..2")
    line = refused(train_net.main, [*base, "--round_set", "2:=3"], tmp_path, before)
    assert line == ("error: --round_set '2:=3': an override must look like key.sub=value, e.g. "
                    "solver.max_iter=1000")


def test_a_training_set_without_objects_is_refused(tmp_path):
    data, images = synthetic(tmp_path)
    dataset = json.loads(data.read_text())
    for ann in dataset["annotations"][1:]:
        ann["iscrowd"] = 1
    first = dataset["annotations"][0]
    first["bbox"] = [first["bbox"][0], first["bbox"][1], 0.5, first["bbox"][3]]  # under 1 px wide: skipped
    data.write_text(json.dumps(dataset))
    before = files(tmp_path)
    line = refused(train_net.main, train_args(tmp_path, data, images), tmp_path, before)
    assert line == (f"error: {data}: no object to train on in its 2 images (crowd regions and boxes under 1 px are "
                    "left out); check data.train_json, or lower --score_thresh of the round that made it")
    first["bbox"][2] = 1.0  # exactly 1 px: one object, which trains (counted as `target` keeps it)
    from detectron2_train.data import CocoInstances

    data.write_text(json.dumps(dataset))
    assert CocoInstances(data, images).num_objects() == 1


def test_pseudo_topk_needs_pseudo_json(tmp_path):
    data, images = synthetic(tmp_path)
    before = files(tmp_path)
    line = refused(train_net.main, train_args(tmp_path, data, images, "--pseudo_topk", "2"), tmp_path, before)
    assert line == "error: --pseudo_topk needs --pseudo_json (the pseudo-masks it keeps the best K of per image)"


def deeplab_checkpoint(path: Path) -> Path:
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "fingerprint": {"kind": "deeplab"}}, path)
    return path


def test_a_checkpoint_of_the_wrong_kind_says_what_it_is(tmp_path):
    data, images = synthetic(tmp_path)
    weights = deeplab_checkpoint(tmp_path / "deeplab.pth")
    before = files(tmp_path)
    expected = (f"error: {weights} is a DeepLab-v3 checkpoint (segmentation/train.py); expected a Mask R-CNN "
                "checkpoint (detectron2_train/train_net.py)")
    line = refused(train_net.main, train_args(tmp_path, data, images, "--eval_only", "--weights", str(weights),
                                              "--test_json", str(data), "--test_root", str(images)),
                   tmp_path, before)
    assert line == expected
    line = refused(train_net.main, train_args(tmp_path, data, images, "--stage", "mask", "--weights", str(weights)),
                   tmp_path, before)
    assert line == expected
    line = refused(gen_pa_masks.main, ["--dataset", "folder", "--dataset_root", str(images), "--affinity",
                                       str(weights), "--pred_json_path", str(tmp_path / "pa.json")], tmp_path, before)
    assert line == (f"error: {weights} is a DeepLab-v3 checkpoint (segmentation/train.py); expected a PA "
                    "predictor checkpoint (detectron2_train/train_affinity.py)")


def test_make_split_on_a_gt_without_categories(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    before = files(tmp_path)
    line = refused(make_split.main, ["--gt_file", str(gt), "--out_dir", str(tmp_path / "splits")], tmp_path, before)
    assert line == (f"error: {gt} has no 'categories': make_split splits a dataset's categories into seen (A) and "
                    "unseen (B) classes; pass a COCO dataset that lists them")


SIZE = (40, 60)


def square(y0: int = 5, x0: int = 5) -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[y0:y0 + 15, x0:x0 + 25] = 1
    return mask


def write_eval_files(tmp_path: Path, gt_masks: list[np.ndarray],
                     pred_category: dict | None = None) -> tuple[Path, Path]:
    images = [{"id": 1, "file_name": "a.jpg", "height": SIZE[0], "width": SIZE[1]}]
    gt_anns = []
    for i, mask in enumerate(gt_masks):
        ann = {**make_annotation(mask, 1, 1), "id": i + 1}
        del ann["score"]
        gt_anns.append(ann)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": gt_anns,
                              "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]}))
    preds = tmp_path / "masks.json"
    anns = [{**make_annotation(square(), 1, 1, 0.9), "id": 1}]
    preds.write_text(json.dumps({"images": images, "annotations": anns,
                                 "categories": [pred_category or {"id": 1, "name": "person"}]}))
    return preds, gt


def test_a_box_only_gt_is_an_error_in_segm_mode_and_a_stray_empty_mask_a_warning(tmp_path):
    empty = np.zeros(SIZE, np.uint8)
    preds, gt = write_eval_files(tmp_path, [empty, empty])
    before = files(tmp_path)
    line = refused(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt)], tmp_path, before)
    assert line == (f"error: {gt}: every ground-truth object has an empty mask (e.g. annotation #0 (image_id 1)); "
                    "mask AP needs masks (use --iou_type bbox, or fix the GT)")
    preds, gt = write_eval_files(tmp_path, [square(), empty])  # one degenerate object among real ones
    code, out, err = run_main(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt)])
    assert code == 0 and out.strip().splitlines()[-1] == "segm AP50: 50.50", err  # a miss: recall 0.5 (101-point AP)
    assert f"warning: {gt}: 1 of 2 ground-truth objects have an empty mask (e.g. annotation #1 (image_id 1))" in err
    gt_data = json.loads(gt.read_text())
    gt_data["annotations"][1]["iscrowd"] = 1  # an empty crowd region only ignores nothing: fine
    gt.write_text(json.dumps(gt_data))
    code, out, err = run_main(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt)])
    assert code == 0 and out.strip().splitlines()[-1] == "segm AP50: 100.00", err
    assert "warning" not in err
    one_pixel = np.zeros(SIZE, np.uint8)
    one_pixel[30, 50] = 1  # the smallest mask there is: not empty
    gt_data["annotations"][1] = {**make_annotation(one_pixel, 1, 1), "id": 2}
    gt.write_text(json.dumps(gt_data))
    code, out, err = run_main(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt)])
    assert code == 0, err


def test_class_aware_object_masks_against_coco_classes_are_refused(tmp_path):
    preds, gt = write_eval_files(tmp_path, [square()], {"id": 1, "name": "object", "supercategory": "object"})
    before = files(tmp_path)
    line = refused(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt)], tmp_path, before)
    assert line == (f"error: {preds}: category 1 is 'object' there but 'person' in {gt}: a class-aware score would "
                    "count its masks as 'person'; pass --class_agnostic, or label the masks with the GT's classes "
                    "(utils/cluster.py --gt_file)")
    code, out, err = run_main(eval_instances.main, ["--input_file", str(preds), "--gt_file", str(gt),
                                                    "--class_agnostic"])
    assert code == 0 and out.strip().splitlines()[-1] == "segm AP50: 100.00", err
