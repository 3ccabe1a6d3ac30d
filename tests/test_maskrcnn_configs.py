"""The MaskX R-CNN ablation configs and the CutLER configs: what each resolves to, and that each builds."""
from __future__ import annotations

from pathlib import Path

import pytest

from detectron2_train.engine import DEFAULTS
from detectron2_train.modeling import build_model
from utils.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detectron2"
# A tiny model with the same heads: building the real R50 (with ImageNet weights) is not the point here.
TINY_MODEL = ["model.backbone=tiny", "model.backbone_weights=none", "model.norm=gn", "model.fpn_channels=32",
              "model.box_head_dim=64", "model.mask_head_channels=32", "model.transfer.hidden_dim=16",
              "model.transfer.randn_dim=8"]

# config -> (stage, mask head, transfer input, layers, activation, MLP branch, gradient into the box head)
MASKX_ROWS = {
    "maskx_rcnn": ("e2e", "transfer", "cls+box", 2, "leaky_relu", True, False),
    "e2e/transfer": ("e2e", "transfer", "cls+box", 2, "leaky_relu", False, False),
    "e2e/transfer_no_stopgrad": ("e2e", "transfer", "cls+box", 2, "leaky_relu", False, True),
    "e2e/class_agnostic": ("e2e", "agnostic", None, None, None, None, None),
    "e2e/fully_supervised": ("e2e", "standard", None, None, None, None, None),
    "sw/box_stage": ("box", "transfer", "cls+box", 2, "leaky_relu", True, False),
    "sw/transfer_mlp": ("mask", "transfer", "cls+box", 2, "leaky_relu", True, False),
    "sw/transfer": ("mask", "transfer", "cls+box", 2, "leaky_relu", False, False),
    "sw/class_agnostic": ("mask", "agnostic", None, None, None, None, None),
    "sw/class_agnostic_mlp": ("mask", "agnostic_mlp", None, None, None, None, None),
    "sw/fully_supervised": ("mask", "standard", None, None, None, None, None),
    "sw/input/randn": ("mask", "transfer", "randn", 2, "leaky_relu", False, False),
    "sw/input/glove": ("mask", "transfer", "embedding", 2, "leaky_relu", False, False),
    "sw/input/cls": ("mask", "transfer", "cls", 2, "leaky_relu", False, False),
    "sw/input/box": ("mask", "transfer", "box", 2, "leaky_relu", False, False),
    "sw/structure/1_layer": ("mask", "transfer", "cls+box", 1, "leaky_relu", False, False),
    "sw/structure/2_layer_relu": ("mask", "transfer", "cls+box", 2, "relu", False, False),
    "sw/structure/3_layer_relu": ("mask", "transfer", "cls+box", 3, "relu", False, False),
    "sw/structure/3_layer_leaky_relu": ("mask", "transfer", "cls+box", 3, "leaky_relu", False, False),
}


def test_every_maskx_config_is_listed():
    found = {str(p.relative_to(CONFIGS / "maskx").with_suffix("")) for p in (CONFIGS / "maskx").rglob("*.yaml")}
    assert found == set(MASKX_ROWS)


@pytest.mark.parametrize("name", sorted(MASKX_ROWS))
def test_maskx_config_resolves_to_its_paper_row_and_builds(name, tmp_path):
    cfg = load_config(CONFIGS / "maskx" / f"{name}.yaml", [], DEFAULTS)
    m, t = cfg["model"], cfg["model"]["transfer"]
    stage, head, kind, layers, activation, mlp, grad = MASKX_ROWS[name]
    assert (m["stage"], m["mask_head"]) == (stage, head)
    if head == "transfer":
        assert (t["input"], t["layers"], t["activation"], t["fused_mlp"], t["grad"]) == (kind, layers, activation,
                                                                                         mlp, grad)
    assert cfg["input"]["min_size_train"] == [800] and m["backbone"] == "resnet50"
    assert m["backbone_weights"] == "imagenet" and cfg["solver"]["max_iter"] == 90000
    assert cfg["output_dir"] == "output/maskx/" + name.replace("/", "_")
    glove = tmp_path / "glove.txt"
    glove.write_text("person 1 2 3\ndog 4 5 6\numbrella 0 1 0\n")
    overrides = TINY_MODEL + [f"model.transfer.embedding_file={glove}"]
    model = build_model(load_config(CONFIGS / "maskx" / f"{name}.yaml", overrides, DEFAULTS), 3, [1],
                        class_names=["person", "dog", "umbrella"])
    assert model.stage == stage


def test_cutler_configs_hold_the_published_hyper_parameters():
    first = load_config(CONFIGS / "cutler" / "cascade_mask_rcnn_r50.yaml", [], DEFAULTS)
    m, s, i = first["model"], first["solver"], first["input"]
    assert first["data"]["class_agnostic"] and m["roi_heads"] == "cascade" and m["mask_head"] == "agnostic"
    assert m["cascade_ious"] == [0.5, 0.6, 0.7] and m["droploss"] and m["droploss_iou"] == 0.01
    assert (m["norm"], m["fpn_norm"], m["trainable_layers"]) == ("syncbn", True, 5)
    assert (m["rpn_post_nms_top_n_train"], m["rpn_nms_thresh"], m["box_score_thresh"]) == (4000, 0.65, 0.0)
    assert (s["base_lr"], s["weight_decay"], s["steps"], s["gamma"], s["max_iter"]) == (0.01, 5e-5, [80000], 0.02,
                                                                                        160000)
    assert (s["ims_per_batch"], s["clip_grad_norm"], s["amp"], s["warmup_iters"]) == (16, 1.0, True, 1000)
    assert i["min_size_train"] == [240, 320, 480, 640, 672, 704, 736, 768, 800, 1024] and i["max_size_train"] == 1333
    assert i["copy_paste"] == {"rate": 1.0, "min_ratio": 0.3, "max_ratio": 1.0, "random_num": True}
    self_train = load_config(CONFIGS / "cutler" / "cascade_mask_rcnn_r50_self_train.yaml", [], DEFAULTS)
    m, s, i = self_train["model"], self_train["solver"], self_train["input"]
    assert not m["droploss"] and (m["rpn_post_nms_top_n_train"], m["rpn_nms_thresh"]) == (1000, 0.7)
    assert (s["base_lr"], s["weight_decay"], s["steps"], s["max_iter"]) == (0.005, 1e-4, [], 80000)
    assert i["copy_paste"]["min_ratio"] == 0.5 and i["copy_paste"]["rate"] == 1.0
    for name in ("cascade_mask_rcnn_r50", "cascade_mask_rcnn_r50_self_train"):  # SyncBN kept, tiny backbone
        tiny = load_config(CONFIGS / "cutler" / f"{name}.yaml", TINY_MODEL[:2] + TINY_MODEL[3:6], DEFAULTS)
        assert build_model(tiny, 1).roi_heads.num_stages == 3


def test_docs_list_every_maskx_and_cutler_config():
    """docs/mask_rcnn.md names each config of maskx/ and cutler/ (with its paper row or CutLER config)."""
    docs = (CONFIGS.parents[1] / "docs" / "mask_rcnn.md").read_text()
    names = [f"`{p.relative_to(CONFIGS / 'maskx').as_posix()}`" for p in (CONFIGS / "maskx").rglob("*.yaml")]
    names += [f"`cutler/{p.name}`" for p in (CONFIGS / "cutler").glob("*.yaml")]
    names += [f"`{p.name}`" for p in CONFIGS.glob("tiny_maskx_*.yaml")]
    assert len(names) == 19 + 5 + 2 and [n for n in names if n not in docs] == []
