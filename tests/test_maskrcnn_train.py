"""Mask R-CNN training: convergence on synthetic shapes, exact resume, CLI errors, two-process torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from detectron2_train import train_net
from detectron2_train.data import CocoInstances
from detectron2_train.engine import DEFAULTS, RESUME_HARMLESS_KEYS, predict, run, train
from detectron2_train.modeling import build_model, set_image_sizes
from tests.helpers.ports import free_port
from tests.helpers.synthetic_shapes import make_dataset
from evaluation.coco_eval import EvalOptions, evaluate_predictions
from utils.coco_io import box_iou_xywh, decode_segmentation, load_json
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import fingerprint
from tests.cli_helpers import run_main
from training_helpers import assert_resumed_runs_match, copy_with_foreign_rng, kill_and_resume

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "detectron2" / "tiny_test.yaml"


def tiny_cfg(tmp_path: Path, data_json: Path, **solver) -> dict:
    cfg = load_config(TINY, [], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"].update(train_json=str(data_json), train_root=str(data_json.parent / "images"), num_workers=0)
    cfg["solver"].update(solver)
    return cfg


@pytest.mark.slow
def test_tiny_model_learns_synthetic_shapes_with_transfer_head(tmp_path, one_thread):
    """Loss goes down, trained objects are detected, and set-B (ellipse) boxes get good masks."""
    data = make_dataset(tmp_path / "syn", num_images=6, seed=1, empty_images=1)
    (tmp_path / "A.txt").write_text("rectangle\n")
    cfg = tiny_cfg(tmp_path, data, max_iter=240, steps=[200], checkpoint_period=1000, log_period=10)
    cfg["model"]["mask_head"] = "transfer"
    cfg["data"]["mask_classes"] = str(tmp_path / "A.txt")
    final = train(cfg, DistInfo())
    assert final.is_file()
    records = [json.loads(line) for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["total_loss"], np.mean([r["total_loss"] for r in records[-3:]])
    assert last < 0.5 * first, (first, last)

    state = torch.load(final, weights_only=False)
    categories = state["extra"]["categories"]
    model = build_model(cfg, len(categories), state["extra"]["mask_classes"])
    model.load_state_dict(state["model"])
    set_image_sizes(model, cfg, training=False)
    dataset = CocoInstances(data, data.parent / "images", categories=categories, with_targets=False)
    results = predict(model, dataset, categories, DistInfo())
    gt = load_json(data)
    by_image = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    mask_ious_b = []
    for ann in gt["annotations"]:
        preds = [r for r in by_image.get(ann["image_id"], []) if r["score"] > 0.5 and r["category_id"] == ann["category_id"]]
        assert preds, f"object {ann['id']} (category {ann['category_id']}) not detected"
        ious = box_iou_xywh(np.array([ann["bbox"]]), np.array([p["bbox"] for p in preds]))[0]
        assert ious.max() > 0.5, f"object {ann['id']}: best box IoU {ious.max():.2f}"
        if ann["category_id"] == 2:  # set B: no mask supervision, mask from the transferred weights
            best = preds[int(ious.argmax())]
            pm = decode_segmentation(best["segmentation"], 64, 64).astype(bool)
            gm = decode_segmentation(ann["segmentation"], 64, 64).astype(bool)
            mask_ious_b.append((pm & gm).sum() / max((pm | gm).sum(), 1))
    assert mask_ious_b, "the synthetic set should contain ellipses"
    assert np.mean(mask_ious_b) > 0.5, mask_ious_b
    empty_image = max(img["id"] for img in gt["images"])
    assert not [r for r in by_image.get(empty_image, []) if r["score"] > 0.5]
    # AP on set A and on set B, reported separately as eval_instances.py --eval_classes does
    for name, category_id in (("rectangle", 1), ("ellipse", 2)):
        report = evaluate_predictions(results, gt, EvalOptions(iou_types=("segm",), eval_classes=(name,)),
                                      agnostic_recall=False)
        assert report.eval_category_ids == [category_id]
        assert report.metrics["segm"]["AP50"] > 50, (name, report.metrics["segm"])


def test_killed_run_resumes_exactly_on_every_rank(tmp_path, one_thread, monkeypatch):
    """Killed after iteration 5 (checkpoint at 3, a torn metrics line): --resume ends with the weights and
    the log of an uninterrupted run, also on a rank whose RNG state is not in the checkpoint."""
    data = make_dataset(tmp_path / "syn", num_images=5, seed=2, empty_images=1)
    kwargs = dict(max_iter=6, checkpoint_period=3, warmup_iters=2, steps=[4], log_period=1)
    configs = {}
    for name in ("straight", "killed", "other_rank"):
        configs[name] = tiny_cfg(tmp_path / name, data, **kwargs)
        configs[name]["input"]["min_size_train"] = [56, 64, 72]  # the multi-scale draw uses the global RNG
    straight = train(configs["straight"], DistInfo())

    killed_dir = Path(configs["killed"]["output_dir"])
    resumed = kill_and_resume(lambda resume=False: train(configs["killed"], DistInfo(), resume=resume), monkeypatch,
                              killed_dir)
    # Every rank > 0 under torchrun resumes without its own RNG state.
    other_dir = Path(configs["other_rank"]["output_dir"])
    copy_with_foreign_rng(Path(configs["straight"]["output_dir"]) / "model_0000003.pth", other_dir)
    other = train(configs["other_rank"], DistInfo(), resume=True)

    assert_resumed_runs_match(Path(straight), Path(resumed), Path(other), killed_dir, other_dir)
    start = build_model(configs["straight"], 2).state_dict()
    final = torch.load(straight, weights_only=False)["model"]
    changed = sum(not torch.equal(start[k], final[k]) for k in start if start[k].is_floating_point())
    assert changed > 10  # training did move the weights
    # The schedule does not depend on max_iter: a finished run can be extended; other data cannot resume.
    extended = {**configs["killed"], "solver": {**configs["killed"]["solver"], "max_iter": 7}}
    assert train(extended, DistInfo(), resume=True) == resumed
    assert torch.load(resumed, weights_only=False)["iteration"] == 7
    other_data = make_dataset(tmp_path / "syn2", num_images=5, seed=3)
    moved = {**extended, "data": {**extended["data"], "train_json": str(other_data),
                                  "train_root": str(other_data.parent / "images")}}
    with pytest.raises(UserError, match=r"it was made with data\.train_json=.*syn/annotations\.json \(sha256 [0-9a-f]{12}\), "
                                        r"not .*syn2/annotations\.json \(sha256"):
        train(moved, DistInfo(), resume=True)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=4, seed=3)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "detectron2_train" / "train_net.py"), "--config", str(TINY), "--device", "cpu",
           "--train_json", str(data), "--train_root", str(data.parent / "images"), "--output_dir", str(out),
           "--set", "solver.max_iter=3", "solver.checkpoint_period=100", "solver.ims_per_batch=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in out.glob("*.pth"))
    assert checkpoints == ["model_final.pth"]
    assert not list(out.glob(".*.tmp"))
    state = torch.load(out / "model_final.pth", weights_only=False)
    assert state["iteration"] == 3 and state["extra"]["world_size"] == 2
    model = build_model(state["config"], 2)
    model.load_state_dict(state["model"])


def test_bad_inputs_give_clear_errors(tmp_path):
    from detectron2_train.train_net import config_from_args, parse_args
    from utils.errors import UserError

    data = make_dataset(tmp_path / "syn", num_images=2, seed=4)
    images = data.parent / "images"
    args = ["--config", str(TINY), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match="unknown config key"):
        config_from_args(parse_args(args + ["--set", "solver.nope=1"]))
    cfg = config_from_args(parse_args(args + ["--train_json", str(data), "--train_root", str(tmp_path)]))
    with pytest.raises(UserError, match="missing under"):
        train(cfg, DistInfo())
    cfg["data"]["train_json"] = str(images / "0001.png")
    with pytest.raises(UserError, match="not a text JSON file|not valid JSON"):
        train(cfg, DistInfo())
    (tmp_path / "A.txt").write_text("triangle\n")
    cfg = config_from_args(parse_args(args + ["--train_json", str(data), "--train_root", str(images),
                                              "--mask_classes", str(tmp_path / "A.txt")]))
    with pytest.raises(UserError, match="triangle"):
        train(cfg, DistInfo())
    # --resume in a folder whose checkpoint another tool made: one clear line, not a traceback
    cfg = config_from_args(parse_args(args + ["--train_json", str(data), "--train_root", str(images)]))
    Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
    save_checkpoint(Path(cfg["output_dir"]) / "model_0000002.pth", build_model(cfg, 5), iteration=2, config=cfg)
    with pytest.raises(UserError, match=r"cannot resume from .*model_0000002.pth: it records no settings to "
                                        r"compare \(another tool or an older version made it\); use another output "
                                        r"folder, or --overwrite"):
        train(cfg, DistInfo(), resume=True)
    # ... and with the same settings but weights that do not fit (a model changed in the code)
    save_checkpoint(Path(cfg["output_dir"]) / "model_0000002.pth", build_model(cfg, 5), iteration=2, config=cfg,
                    fingerprint=fingerprint("mask_rcnn", cfg, RESUME_HARMLESS_KEYS, {"init_weights": None}))
    with pytest.raises(UserError, match=r"cannot resume from .*model_0000002.pth: it does not fit the configured model"):
        train(cfg, DistInfo(), resume=True)
    # --eval_only with a missing checkpoint: a clear error and no inference folder
    cfg["data"].update(test_json=str(data), test_root=str(images))
    cfg["output_dir"] = str(tmp_path / "eval")
    with pytest.raises(UserError, match="weights not found: .*nope.pth"):
        run(cfg, DistInfo(), eval_only=True, weights=str(tmp_path / "nope.pth"))
    assert not (tmp_path / "eval").exists()


def test_backbone_weights_from_torchvision_and_dino_checkpoints(tmp_path):
    from detectron2_train.modeling import build_backbone
    from utils.errors import UserError

    cfg = load_config(TINY, ["model.backbone=resnet18", "model.norm=frozen_bn", "model.trainable_layers=3"],
                      DEFAULTS)["model"]
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_()  # a buffer the frozen BN must take over too
    plain = {k: v for k, v in reference.state_dict().items()}
    torch.save(plain, tmp_path / "torchvision_r18.pth")
    # DINO's full training checkpoint: the teacher's weights under module.backbone.
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in plain.items() if not k.startswith("fc.")},
                "epoch": 100}, tmp_path / "dino_checkpoint.pth")
    for name in ("torchvision_r18.pth", "dino_checkpoint.pth"):
        body = build_backbone({**cfg, "backbone_weights": str(tmp_path / name)}).body
        assert torch.equal(body["conv1"].weight, plain["conv1.weight"]), name
        assert torch.equal(body["layer4"][1].conv2.weight, plain["layer4.1.conv2.weight"]), name
        assert torch.equal(body["bn1"].running_mean, plain["bn1.running_mean"]), name
        assert not body["layer1"][0].conv1.weight.requires_grad and body["layer2"][0].conv1.weight.requires_grad
    with pytest.raises(UserError, match="do not fit a resnet50"):
        build_backbone({**cfg, "backbone": "resnet50", "backbone_weights": str(tmp_path / "torchvision_r18.pth")})
    with pytest.raises(UserError, match="not found"):
        build_backbone({**cfg, "backbone_weights": str(tmp_path / "missing.pth")})


def test_cli_corrupt_image_is_one_line_and_writes_nothing(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=2, seed=4)
    (data.parent / "images" / "0002.png").write_bytes(b"not a png")
    code, _, stderr = run_main(train_net.main, [
        "--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--train_json", str(data),
        "--train_root", str(data.parent / "images"), "--set", "solver.max_iter=2"])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: cannot read image") and "0002.png" in lines[0]
    assert not list((tmp_path / "out").glob("*.pth"))


@pytest.mark.slow
def test_train_voc_sh_runs_end_to_end_on_voc_mini(voc_mini, tmp_path):
    """The VOC recipe with TINY=1 and ROUNDS=2: pseudo-masks (random ViT), VOC GT, two self-training rounds
    (training, trainval and val predictions, evaluation). Skipping finished rounds is tested in
    test_maskrcnn_self_training.py, in-process."""
    out = tmp_path / "voc"
    env = {**os.environ, "TINY": "1", "ROUNDS": "2", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["sh", "detectron2_train/train_voc.sh", str(voc_mini), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gt = load_json(out / "voc12_val_instances.json")
    trainval = load_json(out / "pseudo_masks.json")
    summary = load_json(out / "rounds.json")
    assert [r["round"] for r in summary] == [1, 2]
    for round_dir, result in zip((out / "round1", out / "round2"), summary):
        assert result["checkpoint"] == str(round_dir / "model_final.pth") and Path(result["checkpoint"]).is_file()
        assert {r["image_id"] for r in load_json(round_dir / "train_results.json")} <= \
            {img["id"] for img in trainval["images"]}
        results = load_json(result["test_results"])  # voc_mini's val images are its trainval images
        assert results and {r["image_id"] for r in results} <= {img["id"] for img in gt["images"]}
        assert set(load_json(round_dir / "eval.json")["metrics"]) == {"bbox", "segm"}
    pseudo = load_json(out / "round2" / "pseudo_labels.json")
    assert pseudo["images"] == trainval["images"] and pseudo["annotations"]
