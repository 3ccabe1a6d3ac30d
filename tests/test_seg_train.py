"""DeepLab-v3 training: the model, backbone weights, loss goes down, exact resume, two-process gloo torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seg_helpers import make_synthetic_set, tiny_overrides
from tests.helpers.ports import free_port
from training_helpers import Killed, assert_same_weights, kill_after, records, tear_metrics
from segmentation.engine import DEFAULTS, build_val_dataset, load_trained_model, segmentation_loss, train
from segmentation.model import build_deeplab, build_from_config
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.resnets import TinyResNet

torch.set_num_threads(1)


def _config(repo_root, data, out, *extra):
    overrides = tiny_overrides(data) + [f"output_dir={out}", *extra]
    return load_config(repo_root / "configs/segmentation/tiny_test.yml", overrides, defaults=DEFAULTS)


def test_resnet50_is_dilated_to_output_stride_8():
    model = build_deeplab(num_classes=5, backbone="resnet50", output_stride=8).eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 96)
        assert model.embed(x).shape == (1, 256, 8, 12)
        assert model(x).shape == (1, 5, 64, 96)
    assert model.backbone.layer4[0].conv2.dilation == (2, 2)


def test_backbone_weights_from_a_moco_style_checkpoint(tmp_path):
    source = TinyResNet()
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "moco.pth.tar")
    model = build_deeplab(3, "tiny", 8, weights=str(tmp_path / "moco.pth.tar"), head_channels=8)
    assert torch.equal(model.backbone.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    with pytest.raises(UserError, match="do not fit a resnet50"):
        build_deeplab(3, "resnet50", 8, weights=str(tmp_path / "moco.pth.tar"))
    with pytest.raises(UserError, match="not found"):
        build_deeplab(3, "tiny", 8, weights=str(tmp_path / "missing.pth"))


def _dataset_loss(model, config):
    dataset = build_val_dataset(config)
    model.eval()
    with torch.no_grad():
        return sum(segmentation_loss(model(item["image"][None]), item["label"][None]).item()
                   for item in (dataset[i] for i in range(len(dataset)))) / len(dataset)


def test_training_lowers_the_loss(tmp_path, repo_root):
    data = make_synthetic_set(tmp_path / "data")
    config = _config(repo_root, data, tmp_path / "out", "solver.max_iter=30", "solver.base_lr=0.02",
                     "solver.checkpoint_period=0")
    torch.manual_seed(0)
    before = _dataset_loss(build_from_config(config), config)
    result = train(config, DistInfo())
    after = _dataset_loss(load_trained_model(config, result["checkpoint"], torch.device("cpu")), config)
    assert after < 0.7 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == list(range(1, 31))
    assert records[-1]["iteration"] == 30 and 0 <= records[-1]["mIoU"] <= 1
    assert (tmp_path / "out" / "config.yaml").exists()


def test_killed_run_resumes_exactly_with_a_clean_log(tmp_path, repo_root, monkeypatch):
    """Killed after iteration 5 (checkpoint at 4, a torn metrics line): --resume ends with the weights and
    the log of an uninterrupted run, validation records included."""
    data = make_synthetic_set(tmp_path / "data", count=5)
    extra = ["solver.max_iter=6", "solver.checkpoint_period=2", "solver.eval_period=3", "solver.log_period=1",
             "solver.keep_checkpoints=1"]
    straight = train(_config(repo_root, data, tmp_path / "a", *extra), DistInfo())
    kill_after(monkeypatch, 5)
    with pytest.raises(Killed):
        train(_config(repo_root, data, tmp_path / "b", *extra), DistInfo())
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pth")) == ["model_0000004.pth"]  # keep 1
    tear_metrics(tmp_path / "b" / "metrics.jsonl")
    with pytest.raises(UserError, match="--resume"):
        train(_config(repo_root, data, tmp_path / "b", *extra), DistInfo())
    resumed = train(_config(repo_root, data, tmp_path / "b", *extra), DistInfo(), resume=True)
    assert_same_weights(straight["checkpoint"], resumed["checkpoint"])
    assert resumed["metrics"] == straight["metrics"] and 0 <= straight["metrics"]["mIoU"] <= 1
    log = records(tmp_path / "b" / "metrics.jsonl")
    assert log == records(tmp_path / "a" / "metrics.jsonl")
    assert [(r["iteration"], "mIoU" in r) for r in log] == [(1, False), (2, False), (3, False), (3, True), (4, False),
                                                           (5, False), (6, False), (6, True)]
    # Another learning rate is another run: refused, naming the setting.
    with pytest.raises(UserError, match=r"cannot resume from .*model_final\.pth: it was made with "
                                        r"solver\.base_lr=0\.01, not 0\.02"):
        train(_config(repo_root, data, tmp_path / "b", *extra, "solver.base_lr=0.02"), DistInfo(), resume=True)


@pytest.mark.slow
def test_two_process_gloo_torchrun_trains(tmp_path, repo_root):
    data = make_synthetic_set(tmp_path / "data", count=3)  # uneven validation shards (2 + 1 images)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "segmentation/train.py", "--config", "configs/segmentation/tiny_test.yml",
           "--output_dir", str(tmp_path / "ddp"), "--device", "cpu",
           "--set", *tiny_overrides(data), "solver.batch_size=4", "solver.max_iter=3", "solver.checkpoint_period=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "model_final.pth").exists()
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r] == [1, 2, 3]  # rank 0 alone writes the log
    assert "mIoU" in records[-1]
    assert proc.stdout.count("finished at iteration 3") == 1
