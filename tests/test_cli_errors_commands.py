"""Command-specific refusals of issue 9: the wrong kind of checkpoint, `--eval_only` without images, device
names in configs (one device check for flags, configs and `resolve_device`), and list files whose names are
not UTF-8."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detectron2_train import train_net
from detectron2_train.engine import SCHEMA as RCNN_SCHEMA
from detectron2_train.modeling import build_model
from detectron2_train.splits import read_class_list
from seg_helpers import make_synthetic_set, tiny_overrides
from segmentation import eval_cluster, linear_finetune
from segmentation import train as seg_train
from segmentation.data import find_image, read_image_list
from segmentation.engine import SCHEMA as SEG_SCHEMA
from segmentation.model import build_from_config
from tests.cli_helpers import error_line, run_main
from utils.checkpoint import checkpoint_kind, save_checkpoint
from utils.config import load_config
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.fingerprint import fingerprint

REPO = Path(__file__).resolve().parents[1]
SEG_TINY = REPO / "configs/segmentation/tiny_test.yml"
RCNN_TINY = REPO / "configs/detectron2/tiny_test.yaml"
MASK_RCNN = "a Mask R-CNN checkpoint (detectron2_train/train_net.py)"
DEEPLAB_OR_PROBE = ("a DeepLab-v3 checkpoint (segmentation/train.py) or a DeepLab-v3 linear-probe checkpoint "
                    "(segmentation/linear_finetune.py)")


# ----------------------------------------------------------------------------- checkpoint kinds (point 16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Mask R-CNN training checkpoint (with its fingerprint), the same weights as a bare state dict, and a
    DeepLab-v3 checkpoint saved without a fingerprint (as older runs and tests do)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("checkpoints")
    cfg = load_config(RCNN_TINY, [], RCNN_SCHEMA)
    model = build_model(cfg, 2)
    save_checkpoint(root / "mask_rcnn.pth", model, iteration=1, config=cfg, fingerprint=fingerprint("mask_rcnn", cfg))
    torch.save(model.state_dict(), root / "mask_rcnn_bare.pth")
    seg = load_config(SEG_TINY, ["data.num_classes=3"], SEG_SCHEMA)
    save_checkpoint(root / "deeplab.pth", build_from_config(seg), iteration=0, config=seg)
    return root


def test_checkpoint_kinds_come_from_the_fingerprint_else_from_the_weights(checkpoints):
    load = lambda name: torch.load(checkpoints / name, weights_only=False)  # noqa: E731
    assert checkpoint_kind(load("mask_rcnn.pth")) == "mask_rcnn"
    assert checkpoint_kind(load("mask_rcnn_bare.pth")) == "mask_rcnn"
    assert checkpoint_kind(load("deeplab.pth")) == "deeplab"
    assert checkpoint_kind({"model": {"conv1.weight": torch.zeros(1)}}) is None  # backbone weights: unknown
    assert checkpoint_kind({"fingerprint": {"kind": "linear_probe"}, "model": {}}) == "linear_probe"


@pytest.mark.parametrize("name", ["mask_rcnn.pth", "mask_rcnn_bare.pth"])
def test_a_mask_rcnn_checkpoint_is_refused_by_eval_cluster(checkpoints, tmp_path, name):
    """Used to raise KeyError: 'num_classes' (the Mask R-CNN config has no data.num_classes)."""
    data = make_synthetic_set(tmp_path / "data", count=2, size=32)
    argv = ["--config", str(SEG_TINY), "--model_path", str(checkpoints / name), "--device", "cpu",
            "--set", *tiny_overrides(data)]
    code, stdout, stderr = run_main(eval_cluster.main, argv)
    assert code == 2 and stdout == ""
    assert error_line(stderr) == f"error: {checkpoints / name} is {MASK_RCNN}; expected {DEEPLAB_OR_PROBE}"


def test_a_mask_rcnn_checkpoint_is_refused_by_linear_finetune(checkpoints, tmp_path):
    data = make_synthetic_set(tmp_path / "data", count=2, size=32)
    out = tmp_path / "probe"
    argv = ["--config_exp", str(SEG_TINY), "--device", "cpu", "--set", *tiny_overrides(data),
            f"pretrained={checkpoints / 'mask_rcnn.pth'}", f"output_dir={out}"]
    code, stdout, stderr = run_main(linear_finetune.main, argv)
    assert code == 2
    assert error_line(stderr) == f"error: {checkpoints / 'mask_rcnn.pth'} is {MASK_RCNN}; expected {DEEPLAB_OR_PROBE}"
    assert not out.exists()


def test_a_deeplab_checkpoint_without_fingerprint_still_loads(checkpoints, tmp_path, capsys):
    data = make_synthetic_set(tmp_path / "data", count=2, size=32)
    argv = ["--config", str(SEG_TINY), "--model_path", str(checkpoints / "deeplab.pth"), "--device", "cpu",
            "--max_fit_pixels", "500", "--set", *tiny_overrides(data)]
    code, stdout, stderr = run_main(eval_cluster.main, argv)
    assert code == 0, stderr
    assert "mIoU" in stdout


# ----------------------------------------------------------------------------- train_net --eval_only (point 15)


def test_eval_only_without_test_json_is_refused(tmp_path, checkpoints):
    """Used to exit 0 and write nothing."""
    argv = ["--config", str(RCNN_TINY), "--eval_only", "--weights", str(checkpoints / "mask_rcnn.pth"),
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    code, stdout, stderr = run_main(train_net.main, argv)
    assert code == 2 and stdout == ""
    assert error_line(stderr) == ("error: --eval_only needs --test_json (or data.test_json): the images to predict; "
                                  "for a plain folder of images, use predict.py --weights CKPT --images DIR --out OUT")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- devices: one check


@pytest.mark.parametrize("name, expected", [("auto", None), ("CPU", "cpu"), (" cpu ", "cpu")])
def test_resolve_device_accepts_what_the_flag_accepts(name, expected):
    device = resolve_device(name)
    assert device.type == (expected or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("name, message", [
    ("tpu", "'tpu' is not a device; use auto (CUDA if available, else CPU), cpu, cuda or cuda:N"),
    ("cuda:x", "'cuda:x' is not a device; use"),
    ("cuda:0", "cuda:0 was asked for but no CUDA GPU is available; use cpu or auto"),
])
def test_resolve_device_refuses_in_one_line(name, message):
    """Used to raise torch's RuntimeError for 'tpu' (a traceback where a config named the device)."""
    if name.startswith("cuda:0") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as caught:
        resolve_device(name)
    assert str(caught.value).startswith(message)


def test_a_device_in_a_config_is_checked_with_the_file_named(tmp_path):
    """`device: tpu` in a segmentation YAML: one line naming the file and the key, nothing created."""
    config = tmp_path / "run.yml"
    config.write_text(yaml.safe_dump({"_base_": str(SEG_TINY), "device": "tpu"}))
    out = tmp_path / "out"
    code, _, stderr = run_main(seg_train.main, ["--config", str(config), "--output_dir", str(out)])
    assert code == 2
    assert error_line(stderr) == (f"error: {config}: device must be auto (CUDA if available, else CPU), cpu, cuda or "
                                  f"cuda:N, got 'tpu'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yml"]
    # A GPU named in a config is only checked when used: the config stays readable on a CPU machine.
    assert load_config(SEG_TINY, ["device=cuda:1"], SEG_SCHEMA)["device"] == "cuda:1"


# ----------------------------------------------------------------------------- list files (point 8)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_an_image_list_with_a_name_that_is_not_utf8_is_read(tmp_path):
    """gen_segmentation writes such names by their bytes; the trainer's list reader used to raise
    UnicodeDecodeError on them."""
    raw = b"caf\xe9_01"  # Latin-1, not UTF-8
    (tmp_path / "list.txt").write_bytes(b"# comment\n" + raw + b"\n\nplain.jpg\n")
    names = read_image_list(tmp_path / "list.txt")
    assert names == [raw.decode("utf-8", "surrogateescape"), "plain"]
    with open(os.path.join(os.fsencode(tmp_path), raw + b".png"), "wb") as f:  # the file, named by its bytes
        f.write(b"x")
    assert os.fsencode(find_image(tmp_path, names[0])) == os.fsencode(tmp_path) + b"/" + raw + b".png"


def test_a_class_list_that_is_not_utf8_is_one_error_line(tmp_path):
    """Used to raise UnicodeDecodeError: now the entry is named as not being a category."""
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "zebra"}]
    path = tmp_path / "A.txt"
    path.write_bytes(b"1  # person\n\xff\xfe\n")
    with pytest.raises(UserError) as caught:
        read_class_list(path, categories)
    assert str(caught.value) == f"{path}: '\\udcff\\udcfe' is not a category of the dataset"
    path.write_bytes(b"zebra\n\n# comment\n1  # person\n")
    assert read_class_list(path, categories) == [1, 2]
    with pytest.raises(UserError, match=f"class list not found: {tmp_path / 'none.txt'}"):
        read_class_list(tmp_path / "none.txt", categories)


def test_repeated_set_flags_all_apply_in_linear_finetune():
    """A second --set used to replace the first silently (train.py and the others extend)."""
    args = linear_finetune.parse_args(["--config_exp", "x.yml", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.overrides == ["a=1", "b=2", "c=3"]
