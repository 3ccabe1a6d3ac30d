"""Registries, not copies: every choice list of a command is its registry (discovery methods, ViT archs), and a new
discovery method is one module plus one `register` line."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
from PIL import Image

import gen_masks
import pipeline
from distill import registry
from distill.registry import FEATURE_SETTINGS, FOREGROUND_RULES, Method, load_method, method_names
from orchestrate.cluster import build_parser as cluster_parser
from orchestrate.pipeline import PipelineSettings, check_settings, tiny_image_flags
from utils.errors import UserError
from utils.vit_archs import ARCHS, BACKBONES, PATCH_SIZES

# A whole discovery method in one module: one mask per image, every patch, scored 0.25.
TOY_MODULE = '''
import numpy as np

from distill.patches import PatchMask
from distill.registry import Method


def propose(features, params):
    return [[PatchMask(mask=np.ones(features.grid, dtype=bool), score=0.25)] for _ in range(features.key.shape[0])]


TOY = Method("toy", propose, {}, fixed_size=28)
'''


def choices(parser: argparse.ArgumentParser, flag: str) -> list:
    return next(list(a.choices) for a in parser._actions if flag in a.option_strings)


def help_of(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(a.help for a in parser._actions if flag in a.option_strings)


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """The toy module on sys.path and its one registration line, undone after the test."""
    (tmp_path / "toy_discovery.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_discovery", raising=False)
    monkeypatch.setattr(registry.METHODS, "entries", dict(registry.METHODS.entries))
    registry.METHODS.register("toy", "toy_discovery:TOY", "one mask: the whole image")
    yield "toy"
    sys.modules.pop("toy_discovery", None)


def test_every_registered_method_is_its_module_s_method():
    assert method_names() == ("maskdistill", "lost", "tokencut", "maskcut")
    for name in method_names():
        method = load_method(name)
        assert isinstance(method, Method) and method.name == name
        assert method.propose.__module__ == registry.METHODS.target(name).split(":")[0]  # declared in its module


def test_a_registration_that_names_another_method_or_none_is_refused(monkeypatch):
    monkeypatch.setattr(registry.METHODS, "entries", dict(registry.METHODS.entries))
    registry.METHODS.register("lost2", "distill.lost:LOST", "a second name")
    with pytest.raises(TypeError, match="is not the Method 'lost2'"):
        load_method("lost2")
    with pytest.raises(ValueError, match="registered twice"):
        registry.METHODS.register("lost", "distill.lost:LOST", "again")
    with pytest.raises(UserError, match="unknown --method 'nope'"):
        load_method("nope")


def test_command_choices_are_the_registries(toy_method):
    """The toy registered at run time is a choice at once: the lists are read from the registries, not copied."""
    for parser in (gen_masks.build_parser(), pipeline.build_parser()):
        assert choices(parser, "--method") == list(method_names()) == ["maskdistill", "lost", "tokencut", "maskcut",
                                                                        "toy"]
        assert "toy: one mask: the whole image" in help_of(parser, "--method")
    parser = gen_masks.build_parser()
    assert choices(parser, "--arch") == list(ARCHS) == list(BACKBONES)
    assert choices(parser, "--patch_size") == list(PATCH_SIZES) == [8, 14, 16]
    assert choices(parser, "--foreground") == list(FOREGROUND_RULES)
    assert choices(parser, "--features") == ["auto", *FEATURE_SETTINGS]
    assert all(arch in help_of(cluster_parser(), "--arch") for arch in ARCHS)


def test_the_feature_and_foreground_choices_are_the_ones_the_methods_apply():
    import torch

    from distill.features import discovery_features
    from distill.maskgen import cls_attention
    from distill.patches import PatchFeatures
    from utils.vit import LastBlockQK

    qk = LastBlockQK(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    for setting in FEATURE_SETTINGS:
        discovery_features(qk, setting)  # each choice is a setting the features know
    features = PatchFeatures(qk.query, qk.key, (2, 2))
    assert cls_attention(features, "eigenvector") is None
    assert cls_attention(features, "attention").shape == (1, 4)


def test_the_pipeline_takes_every_method_at_its_input_policy_s_tiny_size(toy_method, tmp_path):
    assert {name: tiny_image_flags(name) for name in method_names()} == {
        "maskdistill": ["--resize", "224"], "lost": ["--resize", "224"], "tokencut": ["--resize", "224"],
        "maskcut": ["--fixed_size", "224"], "toy": ["--fixed_size", "224"]}
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    for name in method_names():
        check_settings(PipelineSettings(images=str(tmp_path / "images"), out=str(tmp_path / "out"), method=name))
    with pytest.raises(UserError, match="--method 'nope': choose one of maskdistill, lost, tokencut, maskcut, toy"):
        check_settings(PipelineSettings(images=str(tmp_path / "images"), out=str(tmp_path / "out"), method="nope"))


def test_a_method_registered_at_run_time_runs_in_gen_masks(toy_method, tiny_vits14, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 44), (44, 30)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i + 1}.png")
    out = tmp_path / "masks.json"
    assert gen_masks.main(["--dataset", "folder", "--dataset_root", str(root), "--pred_json_path", str(out),
                           "--method", "toy", "--arch", "dinov2_vits14", "--weights", "random", "--num_workers", "0",
                           "--post_workers", "0", "--device", "cpu"]) == 0
    masks = json.loads(out.read_text())
    assert [a["score"] for a in masks["annotations"]] == [0.25, 0.25]
    assert all(a["area"] == img["height"] * img["width"] for a, img in zip(masks["annotations"], masks["images"]))
    with pytest.raises(UserError, match="--heads applies to --method maskdistill, not toy"):
        gen_masks.main(["--dataset", "folder", "--dataset_root", str(root), "--pred_json_path", str(tmp_path / "x.json"),
                        "--method", "toy", "--heads", "3", "--weights", "random"])


# ----------------------------------------------------------------------------- Mask R-CNN parts


def test_train_net_choices_and_the_config_schemas_are_the_parts_registries(monkeypatch, capsys):
    from detectron2_train import affinity_engine, engine, parts, train_net

    monkeypatch.setattr(parts.MASK_HEADS, "entries", dict(parts.MASK_HEADS.entries))
    parts.MASK_HEADS.register("test_head", "detectron2_train.modeling:agnostic_mask_predictor", "a test head")
    assert list(parts.MASK_HEADS) == ["standard", "agnostic", "agnostic_mlp", "transfer", "test_head"]
    for head in parts.MASK_HEADS:
        assert train_net.parse_args(["--config", "c.yaml", "--mask_head", head]).mask_head == head
    for stage in parts.STAGES:
        assert train_net.parse_args(["--config", "c.yaml", "--stage", stage]).stage == stage
    with pytest.raises(SystemExit):
        train_net.parse_args(["--config", "c.yaml", "--mask_head", "nope"])
    assert "test_head" in capsys.readouterr().err
    ranges = engine.SCHEMA.ranges
    assert ranges["model.backbone"] is parts.BACKBONES and ranges["model.mask_head"] is parts.MASK_HEADS
    assert ranges["model.roi_heads"] is parts.ROI_HEADS and ranges["model.stage"] is parts.STAGES
    assert affinity_engine.SCHEMA.ranges["model.backbone"] is parts.BACKBONES
    assert engine.SCHEMA.check({"model": {"mask_head": "test_head"}}, "cfg.yaml") == {"model": {"mask_head": "test_head"}}


def test_a_backbone_is_one_registration(monkeypatch):
    """A backbone registered at run time is allowed by the config schema and built by build_model; an unregistered
    name is refused by the schema with the registry's list."""
    from detectron2_train import parts
    from detectron2_train.engine import DEFAULTS, SCHEMA
    from detectron2_train.modeling import build_backbone, build_model, tiny_resnet_fpn

    with pytest.raises(UserError, match="model.backbone must be one of resnet18, resnet34, resnet50, resnet101, tiny, vit, "
                                        "got 'small_test'"):
        SCHEMA.check({"model": {"backbone": "small_test"}}, "cfg.yaml")
    monkeypatch.setattr(parts.BACKBONES, "entries", dict(parts.BACKBONES.entries))
    calls = []
    monkeypatch.setattr("detectron2_train.modeling.small_test_backbone",
                        lambda cfg: calls.append(cfg["backbone"]) or tiny_resnet_fpn(cfg), raising=False)
    parts.BACKBONES.register("small_test", "detectron2_train.modeling:small_test_backbone", "a test backbone")
    model_cfg = SCHEMA.check({"model": {**DEFAULTS["model"], "backbone": "small_test", "norm": "gn",
                                        "tiny_widths": [4, 8, 8, 8], "fpn_channels": 8}}, "cfg.yaml")["model"]
    assert build_backbone(model_cfg).out_channels == 8 and calls == ["small_test"]
    model = build_model({"model": {**model_cfg, "box_head_dim": 16, "mask_head_channels": 8},
                         "input": DEFAULTS["input"]}, num_classes=2)
    assert model.backbone.out_channels == 8 and calls == ["small_test", "small_test"]


@pytest.mark.parametrize("head,classes", [("standard", 3), ("agnostic", 1)])
def test_each_mask_head_name_builds_its_own_predictor(head, classes):
    from detectron2_train.engine import DEFAULTS
    from detectron2_train.modeling import build_mask_predictor

    predictor = build_mask_predictor({**DEFAULTS["model"], "mask_head": head, "mask_head_channels": 8}, 3)
    assert predictor.mask_fcn_logits.out_channels == classes
