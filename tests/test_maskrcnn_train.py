"""Mask R-CNN training: convergence on synthetic shapes, exact resume, CLI errors, two-process torchrun."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from detectron2_train.data import CocoInstances, TrainingSampler
from detectron2_train.engine import DEFAULTS, predict, run, train
from detectron2_train.modeling import build_model, set_image_sizes
from tests.helpers.synthetic_shapes import make_dataset
from utils.coco_eval import EvalOptions, evaluate_predictions
from utils.coco_io import box_iou_xywh, decode_segmentation, load_json
from utils.checkpoint import rng_states, save_checkpoint
from utils.config import load_config
from utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "detectron2" / "tiny_test.yaml"


def tiny_cfg(tmp_path: Path, data_json: Path, **solver) -> dict:
    cfg = load_config(TINY, [], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["data"].update(train_json=str(data_json), train_root=str(data_json.parent / "images"), num_workers=0)
    cfg["solver"].update(solver)
    return cfg


def test_sampler_is_deterministic_and_resumable():
    full = TrainingSampler(5, seed=3, rank=1, world_size=2)
    stream = [next(it) for it in [iter(full)] for _ in range(12)]
    resumed = TrainingSampler(5, seed=3, rank=1, world_size=2, start=4)
    it = iter(resumed)
    assert [next(it) for _ in range(8)] == stream[4:]
    positions = [p for _, p in stream]
    assert positions == list(range(1, 24, 2))  # rank 1 of 2 takes the odd global positions
    # every epoch is a permutation of the dataset
    both = TrainingSampler(5, seed=3)
    it = iter(both)
    first_epochs = [next(it)[0] for _ in range(10)]
    assert sorted(first_epochs[:5]) == list(range(5)) and sorted(first_epochs[5:]) == list(range(5))


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


def test_resume_gives_the_same_weights(tmp_path, one_thread):
    data = make_dataset(tmp_path / "syn", num_images=5, seed=2, empty_images=1)
    kwargs = dict(max_iter=6, checkpoint_period=3, warmup_iters=2, steps=[4], log_period=1)
    straight = tiny_cfg(tmp_path / "a", data, **kwargs)
    straight["input"]["min_size_train"] = [56, 64, 72]  # exercise the multi-scale draw from the global RNG
    train(straight, DistInfo())

    resumed = tiny_cfg(tmp_path / "b", data, **kwargs)
    resumed["input"]["min_size_train"] = [56, 64, 72]
    resumed["solver"]["max_iter"] = 3  # the "interrupted" run
    train(resumed, DistInfo())
    with pytest.raises(Exception, match="--resume"):
        train({**resumed, "solver": {**resumed["solver"], "max_iter": 6}}, DistInfo())
    resumed["solver"]["max_iter"] = 6
    train(resumed, DistInfo(), resume=True)

    # A process whose RNG state is not in the checkpoint (every rank > 0 under torchrun) must resume
    # exactly too: resume from a copy whose saved RNG states are someone else's, after a kill that
    # cut the last metrics line short.
    other = tiny_cfg(tmp_path / "c", data, **kwargs)
    other["input"]["min_size_train"] = [56, 64, 72]
    Path(other["output_dir"]).mkdir(parents=True)
    state = torch.load(Path(straight["output_dir"]) / "model_0000003.pth", weights_only=False)
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    state["rng"] = rng_states()
    torch.save(state, Path(other["output_dir"]) / "model_0000003.pth")
    (Path(other["output_dir"]) / "metrics.jsonl").write_text('{"iteration": 3, "total_loss": 1.0}\n{"itera')
    train(other, DistInfo(), resume=True)

    a = torch.load(Path(straight["output_dir"]) / "model_final.pth", weights_only=False)
    b = torch.load(Path(resumed["output_dir"]) / "model_final.pth", weights_only=False)
    c = torch.load(Path(other["output_dir"]) / "model_final.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == c["iteration"] == 6
    assert a["model"].keys() == b["model"].keys() == c["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model"][key], c["model"][key]), key
    other_lines = (Path(other["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in other_lines] == [3, 4, 5, 6]
    start = build_model(straight, 2).state_dict()
    changed = sum(not torch.equal(start[k], a["model"][k]) for k in start if start[k].is_floating_point())
    assert changed > 10  # training did move the weights
    lines = (Path(resumed["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_gloo(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=4, seed=3)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
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
    # --resume in a folder whose checkpoint belongs to another model: one clear line, not a traceback
    cfg = config_from_args(parse_args(args + ["--train_json", str(data), "--train_root", str(images)]))
    Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
    save_checkpoint(Path(cfg["output_dir"]) / "model_0000002.pth", build_model(cfg, 5), iteration=2, config=cfg)
    with pytest.raises(UserError, match="cannot resume from .*model_0000002.pth"):
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
    cmd = [sys.executable, str(REPO / "detectron2_train" / "train_net.py"), "--config", str(TINY),
           "--output_dir", str(tmp_path / "out"), "--device", "cpu", "--train_json", str(data),
           "--train_root", str(data.parent / "images"), "--set", "solver.max_iter=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot read image") and "0002.png" in lines[0]
    assert not list((tmp_path / "out").glob("*.pth"))


def test_train_voc_sh_runs_end_to_end_on_voc_mini(voc_mini, tmp_path):
    """The VOC recipe with TINY=1: pseudo-masks (random ViT), VOC GT, training, inference, evaluation."""
    out = tmp_path / "voc"
    env = {**os.environ, "TINY": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["sh", "detectron2_train/train_voc.sh", str(voc_mini), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "round1" / "model_final.pth").is_file()
    results = load_json(out / "round1" / "inference" / "results.json")
    gt = load_json(out / "voc12_val_instances.json")
    assert results and {r["image_id"] for r in results} <= {img["id"] for img in gt["images"]}
    assert "segm" in json.dumps(load_json(out / "round1" / "eval_val.json"))
