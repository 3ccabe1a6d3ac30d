"""The ViT backbone of the detectors (ViTDet's simple feature pyramid) and of DeepLab-v3: shapes for every
arch at odd input sizes, per-image tokens whatever the batch, and which parameters train."""
import copy

import pytest
import torch

import utils.vit_archs as vit_archs
from detectron2_train.engine import DEFAULTS, SCHEMA
from detectron2_train.modeling import build_model
from detectron2_train.vit_backbone import SimpleFeaturePyramid, build_vit_backbone
from segmentation.model import build_from_config
from segmentation.settings import DEFAULTS as SEG_DEFAULTS
from utils.config import load_config
from utils.errors import UserError
from utils.vit_settings import vit_schema_entries
from vit_helpers import TINY_WIDTH, tiny_vits  # noqa: F401 (fixture)

ARCH_PATCHES = [(arch, p) for arch in vit_archs.ARCHS for p in vit_archs.BACKBONES[arch].patch_sizes]


def detector_config(arch="dinov2_vits14", patch_size=None, **vit_keys) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg["model"].update(backbone="vit", fpn_channels=16, box_head_dim=32, mask_head_channels=16, mask_head_convs=1,
                        anchor_sizes=[8, 16, 32, 64, 128], rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                        rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    cfg["model"]["vit"].update(arch=arch, patch_size=patch_size, weights="random", **vit_keys)
    cfg["input"].update(min_size_train=[64], max_size_train=96, min_size_test=64, max_size_test=96)
    return cfg


def test_the_config_choices_are_the_backbone_table():
    _, ranges = vit_schema_entries()
    assert ranges["model.vit.arch"] is vit_archs.ARCHS and ranges["model.vit.patch_size"] is vit_archs.PATCH_SIZES


@pytest.mark.parametrize("arch,patch", ARCH_PATCHES)
def test_pyramid_shapes_for_every_arch_at_odd_sizes(tiny_vits, arch, patch):
    backbone = build_vit_backbone(detector_config(arch, patch)["model"])
    assert backbone.out_channels == 16
    canvas = torch.randn(2, 3, 75, 101)
    backbone.image_sizes = [(75, 101), (43, 58)]
    features = backbone(canvas)
    assert list(features) == ["0", "1", "2", "3", "pool"]
    expected = {"0": (19, 26), "1": (10, 13), "2": (5, 7), "3": (3, 4), "pool": (2, 2)}
    assert {k: tuple(v.shape) for k, v in features.items()} == {k: (2, 16, *hw) for k, hw in expected.items()}
    assert all(torch.isfinite(v).all() for v in features.values())


def test_an_images_tokens_do_not_depend_on_its_batch(tiny_vits):
    body = build_vit_backbone(detector_config("dinov2_vits14_reg")["model"]).body
    torch.manual_seed(0)
    small = torch.randn(3, 37, 50)
    canvas = torch.zeros(2, 3, 64, 96)
    canvas[0, :, :37, :50] = small
    canvas[1] = torch.randn(3, 64, 96)
    batched = body(canvas, [(37, 50), (64, 96)])
    p = body.patch_size
    grid = (-(-37 // p), -(-50 // p))
    alone = body(small[None])
    assert torch.allclose(batched[0, :, :grid[0], :grid[1]], alone[0], atol=1e-5)
    assert not batched[0, :, grid[0]:].any() and not batched[0, :, :, grid[1]:].any()  # zeros beyond the image
    # without the sizes the padding would be part of the image: other tokens
    assert not torch.allclose(body(canvas)[0, :, :grid[0], :grid[1]], alone[0], atol=1e-3)


def test_stride_14_map_is_resampled_onto_the_stride_16_grid():
    """Token j of a stride-14 map covers pixels [14j, 14j + 14): a ramp in x stays a ramp at stride 16."""
    pyramid = SimpleFeaturePyramid(4, 14, 8)
    xs = torch.arange(16, dtype=torch.float32) * 14 + 7  # each token's centre, in pixels
    tokens = xs.view(1, 1, 1, 16).expand(1, 4, 8, 16)
    captured = {}
    pyramid.stages[2].register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    pyramid(tokens, (112, 224))
    centres = torch.arange(14, dtype=torch.float32) * 16 + 8  # stride-16 cells' centres
    assert torch.allclose(captured["x"][0, 0, 0, :13], centres[:13], atol=1e-4)


def test_frozen_vit_gets_no_gradient_and_the_pyramid_does(tiny_vits):
    model = build_model(detector_config(), 1)
    model.train()
    images = [torch.rand(3, 60, 80), torch.rand(3, 50, 70)]
    targets = []
    for img in images:
        masks = torch.zeros(1, *img.shape[1:], dtype=torch.uint8)
        masks[0, 10:40, 10:50] = 1
        targets.append({"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks})
    sum(model(images, targets).values()).backward()
    vit_params = dict(model.backbone.body.vit.named_parameters())
    assert vit_params and all(not p.requires_grad and p.grad is None for p in vit_params.values())
    pyramid = [p.grad for p in model.backbone.pyramid.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in pyramid)
    assert not model.backbone.body.vit.training  # no dropout or drop-path in the ViT, ever


def test_trainable_blocks_train_the_last_blocks_and_norm_only(tiny_vits):
    body = build_vit_backbone(detector_config(trainable_blocks=1)["model"]).body
    body(torch.randn(1, 3, 28, 42)).square().sum().backward()
    grads = {n: p.grad for n, p in body.vit.vit.named_parameters()}
    trained = {n for n, g in grads.items() if g is not None}
    assert trained == {n for n in grads if n.startswith(("blocks.1.", "norm."))}


@pytest.mark.parametrize("keys,message", [({"trainable_blocks": 3}, "trainable_blocks must be 0..2"),
                                          ({"trainable_blocks": 1, "cache_dir": "x"}, "needs model.vit.trainable_blocks 0")])
def test_bad_vit_settings_are_one_clear_error(tiny_vits, keys, message):
    with pytest.raises(UserError, match=message):
        build_vit_backbone(detector_config(**keys)["model"])


def test_config_schema_takes_the_vit_keys_and_refuses_others(tmp_path):
    good = tmp_path / "vit.yaml"
    good.write_text("model:\n  backbone: vit\n  vit:\n    arch: vit_small\n    patch_size: 8\n    trainable_blocks: 2\n")
    cfg = load_config(good, defaults=SCHEMA)
    assert cfg["model"]["vit"] == {"arch": "vit_small", "patch_size": 8, "weights": "dino", "trainable_blocks": 2,
                                   "cache_dir": None}
    for text, culprit in [("arch: vit_huge", "model.vit.arch"), ("patch_size: 12", "model.vit.patch_size"),
                          ("trainable_blocks: -1", "model.vit.trainable_blocks"), ("cache: true", "model.vit.cache")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"model:\n  vit:\n    {text}\n")
        with pytest.raises(UserError, match=culprit.replace(".", r"\.")):
            load_config(bad, defaults=SCHEMA)


@pytest.mark.parametrize("arch,patch", [("vit_small", 16), ("vit_base", 8), ("dinov2_vits14", 14)])
def test_deeplab_aspp_head_on_the_vit_map(tiny_vits, arch, patch):
    cfg = copy.deepcopy(SEG_DEFAULTS)
    cfg["model"].update(backbone="vit", head_channels=16)
    cfg["model"]["vit"].update(arch=arch, patch_size=patch, weights="random")
    cfg["data"]["num_classes"] = 3
    model = build_from_config(cfg).eval()
    images = torch.randn(2, 3, 45, 61)
    assert model.embed(images).shape == (2, 16, -(-45 // patch), -(-61 // patch))
    logits = model(images)
    assert logits.shape == (2, 3, 45, 61)
    # the logits cover the image, not the padded patches: the top-left of a larger input agrees
    assert model.head[0].convs[0][0].in_channels == TINY_WIDTH
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")] == []


@pytest.mark.slow
def test_deeplab_and_linear_probe_train_on_the_frozen_vit(tiny_vits, tmp_path, repo_root):
    """segmentation/train.py, then linear_finetune.py on its checkpoint, with `model.backbone: vit`: only the head
    trains, then only the probe's 1x1 classifier; the ViT keeps its weights throughout."""
    import yaml

    from seg_helpers import make_synthetic_set, tiny_overrides
    from segmentation import linear_finetune, train

    data = make_synthetic_set(tmp_path / "data", count=4, size=56)
    vit_keys = ["model.backbone=vit", "model.vit.arch=dinov2_vits14", "model.vit.weights=random"]
    deeplab = tmp_path / "deeplab"
    train.main(["--config", str(repo_root / "configs/segmentation/tiny_test.yml"), "--output_dir", str(deeplab),
                "--set", *tiny_overrides(data), *vit_keys, "solver.max_iter=3", "solver.checkpoint_period=0"])
    torch.manual_seed(0)
    initial = build_from_config({"data": {"num_classes": 3}, "model": {"backbone": "vit", "head_channels": 16,
                                 "atrous_rates": [2, 4, 6], "vit": {"weights": "random"}}}).state_dict()
    trained = torch.load(deeplab / "model_final.pth", weights_only=False)["model"]
    vit_keys_in_state = [k for k in trained if k.startswith("backbone.")]
    assert vit_keys_in_state and all(torch.equal(trained[k], initial[k]) for k in vit_keys_in_state)
    assert not torch.equal(trained["head.4.weight"], initial["head.4.weight"])
    exp = {"_base_": str(repo_root / "configs/segmentation/tiny_test.yml"), "pretrained": str(deeplab / "model_final.pth"),
           "output_dir": str(tmp_path / "probe"), "solver": {"max_iter": 2, "checkpoint_period": 0}}
    (tmp_path / "linear.yml").write_text(yaml.safe_dump(exp))
    linear_finetune.main(["--config_exp", str(tmp_path / "linear.yml"), "--set", *tiny_overrides(data), *vit_keys])
    probe = torch.load(tmp_path / "probe" / "probe_final.pth", weights_only=False)["model"]
    assert all(torch.equal(probe[k], trained[k]) for k in trained if not k.startswith("head.4."))
    assert not torch.equal(probe["head.4.weight"], trained["head.4.weight"])
