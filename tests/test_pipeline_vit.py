"""pipeline.py on the ViT route end to end: --arch dinov2_vits14 --backbone vit --weights CKPT runs the masks,
Mask R-CNN and DeepLab on that one checkpoint (a random ViT-S/14 in the official key layout, written here) and
writes report.json with rows from every stage. (tests/test_pipeline_checks.py checks the settings it builds.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pipeline
from dinov2_reference import official_layout_state

IMAGES = 4


@pytest.mark.slow
def test_the_vit_route_runs_every_stage_on_one_checkpoint(tiny_coco, tmp_path, one_thread):
    images = tmp_path / "images"
    images.mkdir()
    gt = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
    gt["images"] = sorted(gt["images"], key=lambda image: image["file_name"])[:IMAGES]
    for image in gt["images"]:
        (images / image["file_name"]).symlink_to(tiny_coco / "val2017" / image["file_name"])
    ids = {image["id"] for image in gt["images"]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ckpt = tmp_path / "dinov2_vits14_random.pth"
    torch.save(official_layout_state(0, dim=384, depth=12, grid=37), ckpt)
    out = tmp_path / "out"
    assert pipeline.main(["--images", str(images), "--out", str(out), "--tiny", "--arch", "dinov2_vits14",
                          "--backbone", "vit", "--weights", str(ckpt), "--num_classes", "2",
                          "--self_training_rounds", "1", "--crf_rounds", "0", "--device", "cpu",
                          "--gt_json", str(tmp_path / "gt.json")]) == 0

    masks = json.loads((out / "masks" / "masks.json").read_text())
    assert masks["info"]["settings"]["arch"] == "dinov2_vits14" and masks["info"]["settings"]["patch_size"] == 14
    # the detector and DeepLab were built on the same checkpoint, and the detector filled its token cache in OUT
    mask_rcnn = json.loads((out / "maskrcnn" / "step.json").read_text())["fingerprint"]
    assert f"model.vit.weights={ckpt}" in mask_rcnn["settings"]["settings.overrides"]
    assert mask_rcnn["files"]["settings.weights"]["path"] == str(ckpt)  # counted by its content
    assert any((out / "vit_cache" / "entries").iterdir())
    deeplab = json.loads((out / "deeplab" / "step.json").read_text())["result"]["config"]["model"]
    assert deeplab["backbone"] == "vit" and deeplab["vit"] == {**deeplab["vit"], "arch": "dinov2_vits14",
                                                              "weights": str(ckpt)}
    report = json.loads((out / "report.json").read_text())
    assert [(row["stage"], row["status"]) for row in report["stages"]] == [
        (stage, "ran") for stage in ("masks", "cluster", "maskrcnn", "semantic", "deeplab", "eval")]
    assert {"masks", "cluster", "maskrcnn", "deeplab"} <= {row["stage"] for row in report["metrics"]}
    assert "gt.json (4 images, 35 objects, class-agnostic)" in {row["against"] for row in report["metrics"]}
