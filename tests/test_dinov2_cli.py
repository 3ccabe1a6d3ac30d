"""gen_masks.py with DINOv2: --arch / --patch_size rules, --features, --precision (and the --half
alias) resolved and recorded, and a resume that refuses a change of precision."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

import distill.engine as engine_module
import utils.vit as vit
import gen_masks
from tests import cli_helpers
from utils.errors import UserError


def parse(*args):
    return gen_masks.build_parser().parse_args([*map(str, args)])


def generate(*args):
    parser = gen_masks.build_parser()
    return engine_module.generate_masks(engine_module.gen_masks_from_args(parser.parse_args([*map(str, args)])))


@pytest.fixture
def tiny_vits14(monkeypatch):
    """`dinov2_vits14` as a 2-block, width-32 model: the same settings, built in milliseconds."""
    tiny = dataclasses.replace(vit.BACKBONES["dinov2_vits14"],
                               timm_kwargs=(("embed_dim", 32), ("depth", 2), ("num_heads", 2), ("img_size", 70)))
    monkeypatch.setitem(vit.BACKBONES, "dinov2_vits14", tiny)


@pytest.fixture
def three_images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 44), (44, 30), (30, 44)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i + 1}.png")
    return root


def job(root, out, *extra):
    return ["--dataset", "folder", "--dataset_root", root, "--resize", 0, "--pred_json_path", out,
            "--arch", "dinov2_vits14", "--weights", "random", "--num_workers", 0, "--batch_size", 2, *extra]


def test_arch_choices_are_the_backbone_table():
    assert gen_masks.ARCHS == list(vit.ARCHS)


def test_half_is_an_alias_of_bf16_and_auto_is_the_default():
    assert parse("--pred_json_path", "x.json").precision == "auto"
    assert parse("--pred_json_path", "x.json", "--half").precision == "bf16"
    assert parse("--pred_json_path", "x.json", "--precision", "fp32").precision == "fp32"
    assert parse("--pred_json_path", "x.json").patch_size is None


def test_dinov2_with_a_dino_patch_size_is_refused_before_any_work(three_images, tmp_path):
    out = tmp_path / "masks.json"
    with pytest.raises(UserError, match="--arch dinov2_vits14 has patch size 14, not --patch_size 16"):
        generate(*job(three_images, out, "--patch_size", 16))
    assert not out.exists() and not (tmp_path / "masks.json.parts").exists()


def test_dinov2_run_records_its_resolved_settings_and_resume_refuses_another_precision(three_images, tmp_path,
                                                                                    monkeypatch, tiny_vits14):
    out = tmp_path / "masks.json"
    generate(*job(three_images, out, "--precision", "bf16"))
    settings = json.loads(out.read_text())["info"]["settings"]
    assert (settings["arch"], settings["patch_size"], settings["features"], settings["precision"]) == (
        "dinov2_vits14", 14, "centred", "bf16")

    interrupted = tmp_path / "interrupted.json"
    # after the first batch: the part holds image records (an empty part is replaced)
    monkeypatch.setattr(engine_module, "backbone_features",
                        cli_helpers.interrupt_on_call(engine_module.backbone_features, 2))
    with pytest.raises(KeyboardInterrupt):
        generate(*job(three_images, interrupted, "--half"))
    with pytest.raises(UserError, match="made with precision='bf16', not 'fp32'"):
        generate(*job(three_images, interrupted, "--precision", "fp32", "--resume"))
    with pytest.raises(UserError, match="made with features='centred', not 'raw'"):
        generate(*job(three_images, interrupted, "--half", "--features", "raw", "--resume"))
