"""The CutLER and MaskX stage-wise recipes end to end with TINY=1 on the shared tiny_coco images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detectron2_train.pseudo_labels import pseudo_label_dataset
from utils.coco_io import load_json

REPO = Path(__file__).resolve().parents[1]


def _recipe(script: str, *args: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINY": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    proc = subprocess.run(["sh", f"detectron2_train/{script}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _few_images(gt_json: Path, image_dir: Path, count: int, out_json: Path, out_dir: Path) -> set[int]:
    """The first `count` images of a COCO split (by file name) and their GT: symlinks in out_dir, a GT file at
    out_json (every category kept). Returns their ids. A handful of images keeps the recipes' tests quick."""
    out_dir.mkdir(parents=True)
    coco = load_json(gt_json)
    chosen = sorted(coco["images"], key=lambda img: img["file_name"])[:count]
    for img in chosen:
        (out_dir / img["file_name"]).symlink_to(image_dir / img["file_name"])
    ids = {img["id"] for img in chosen}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({**coco, "images": chosen,
                                    "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}))
    return ids


@pytest.mark.slow
def test_train_cutler_sh_runs_its_rounds_and_skips_them_when_rerun(tiny_coco, tmp_path):
    """MaskCut pseudo-masks, round 1 on CutLER's first config, rounds 2 and 3 on the self-training config from
    the previous weights, with the 0.7 / 0.65 thresholds and the add-back; evaluated on the images' own GT."""
    images, gt = tmp_path / "images", tmp_path / "gt.json"
    ids = _few_images(tiny_coco / "annotations" / "instances_val2017.json", tiny_coco / "val2017", 4, gt, images)
    out = tmp_path / "cutler"
    proc = _recipe("train_cutler.sh", images, out, gt)

    masks = out / "pseudo_masks.json"
    assert {img["id"] for img in load_json(masks)["images"]} == ids and load_json(masks)["annotations"]
    made_by = load_json(masks)["info"]["settings"]  # CutLER's MaskCut (official tau and objects), TINY's 224 px
    assert (made_by["method"], made_by["tau"], made_by["num_objects"], made_by["fixed_size"]) == ("maskcut", 0.15, 3,
                                                                                                  224)
    assert [r["round"] for r in load_json(out / "rounds.json")] == [1, 2, 3]
    first, later = _config(out / "round1" / "config.yaml"), _config(out / "round2" / "config.yaml")
    assert first["model"]["droploss"] and first["model"]["roi_heads"] == "cascade"
    assert first["input"]["copy_paste"]["min_ratio"] == 0.3 and first["solver"]["base_lr"] == 0.01
    assert not later["model"]["droploss"] and later["model"]["roi_heads"] == "cascade"
    assert later["input"]["copy_paste"]["min_ratio"] == 0.5 and later["solver"]["base_lr"] == 0.005
    assert _config(out / "round3" / "config.yaml")["model"] == later["model"]
    previous = masks
    for number, thresh in ((2, 0.7), (3, 0.65)):
        round_dir = out / f"round{number}"
        settings = load_json(round_dir / "round.json")["settings"]["settings"]
        assert (settings["self_training.score_thresh"], settings["self_training.add_back_iou"],
                settings["self_training.init"]) == (thresh, 0.5, "previous round")
        expected = pseudo_label_dataset(out / f"round{number - 1}" / "train_results.json", masks, thresh, previous, 0.5)
        assert load_json(round_dir / "pseudo_labels.json")["annotations"] == expected["annotations"]
        weights = torch.load(round_dir / "model_final.pth", weights_only=False)["fingerprint"]["files"]
        assert weights["init_weights"]["path"] == str(out / f"round{number - 1}" / "model_final.pth")
        previous = round_dir / "pseudo_labels.json"
    for number in (1, 2, 3):  # the GT lists the training images: their predictions are evaluated
        assert set(load_json(out / f"round{number}" / "eval.json")["metrics"]) == {"bbox", "segm"}
        assert not (out / f"round{number}" / "inference").exists()
    for number in (1, 2, 3):  # the summary line says what was compared with what
        metrics = load_json(out / f"round{number}" / "eval.json")["metrics"]
        numbers = "; ".join(f"{t} AP {metrics[t]['AP'] or 0.0:.1f} AP50 {metrics[t]['AP50'] or 0.0:.1f}"
                            for t in ("bbox", "segm"))
        assert (f"round {number}: {numbers}: {out / f'round{number}' / 'train_results.json'} against the ground truth "
                f"in {gt}") in proc.stdout.splitlines()

    stamps = [(out / f"round{n}" / "model_final.pth").stat().st_mtime_ns for n in (1, 2, 3)]
    rerun = _recipe("train_cutler.sh", images, out, gt)
    assert [f"round {n}: already done in {out / f'round{n}'}" in rerun.stdout for n in (1, 2, 3)] == [True] * 3
    assert [(out / f"round{n}" / "model_final.pth").stat().st_mtime_ns for n in (1, 2, 3)] == stamps


@pytest.mark.slow
def test_train_maskx_sh_trains_box_then_mask_stage_and_prints_set_a_and_b(tiny_coco, tmp_path):
    """The whole script on a COCO root of tiny_coco's first 4 train and 4 val images (docs/mask_rcnn.md quotes
    the run on all 50 + 50)."""
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        _few_images(tiny_coco / "annotations" / f"instances_{split}.json", tiny_coco / split, 4,
                    root / "annotations" / f"instances_{split}.json", root / split)
    out = tmp_path / "maskx"
    proc = _recipe("train_maskx.sh", root, out)
    sets = {name: [int(line.split()[0]) for line in (out / "splits" / f"{name}.txt").read_text().splitlines()]
            for name in "AB"}
    assert len(sets["A"]) == 20 and sets["A"][:3] == [1, 2, 3] and len(sets["B"]) == 60  # A: the VOC classes
    run = out / "tiny_maskx_transfer"
    box_cfg, mask_cfg = _config(out / "box_stage" / "config.yaml"), _config(run / "config.yaml")
    assert (box_cfg["model"]["stage"], mask_cfg["model"]["stage"]) == ("box", "mask")
    assert mask_cfg["model"]["mask_head"] == "transfer" and mask_cfg["data"]["mask_classes"] == str(out / "splits" / "A.txt")
    box, mask = (torch.load(d / "model_final.pth", weights_only=False)["model"] for d in (out / "box_stage", run))
    frozen = [k for k in box if k.startswith(("backbone.", "rpn.", "roi_heads.box_head.", "roi_heads.box_predictor."))]
    assert frozen and all(torch.equal(box[k], mask[k]) for k in frozen)  # stage mask left the detector as it was
    trained = [k for k in mask if k.startswith("roi_heads.mask_") and k in box and mask[k].is_floating_point()]
    assert any(not torch.equal(box[k], mask[k]) for k in trained)
    for name, ids in sets.items():  # each set evaluated on its own classes, masks and boxes
        report = load_json(run / "inference" / f"eval_{name}.json")
        assert report["eval_category_ids"] == sorted(ids) and set(report["metrics"]) == {"bbox", "segm"}
    table = proc.stdout.strip().splitlines()[-5:]
    assert table[0].startswith("| run | mask AP on B | AP50 on B | mask AP on A | AP50 on A")
    assert table[2].startswith(f"| {run} | ")
    val_json = root / "annotations" / "instances_val2017.json"
    assert table[4] == f"{run}: mask AP of inference/results.json against the ground truth in {val_json}"
    for iou_type, stats in load_json(run / "inference" / "coco_eval.json").items():  # train_net's summary lines
        numbers = "  ".join(f"{k} {v:.1f}" for k, v in stats.items())
        assert (f"{iou_type} {numbers}: {run / 'inference' / 'results.json'} against the ground truth in "
                f"{val_json}") in proc.stdout.splitlines()
