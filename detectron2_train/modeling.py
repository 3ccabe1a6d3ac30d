"""Build torchvision's Mask R-CNN (FPN) from the `model` section of a config.

Backbones: torchvision ResNets (`resnet50` default, `resnet18/34/101`) or `tiny`, a small
ResNet for tests and CPU runs. Backbone weights: `none`, `imagenet` (torchvision's official
ImageNet URL) or a path to a torchvision / DINO / MoCo ResNet checkpoint.
Mask heads: `standard` (class-specific, fully supervised), `agnostic` (one mask per box) or
`transfer` (MaskX R-CNN weight transfer, see transfer_head.py).
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from detectron2_train.roi_heads import MaskRoIHeads
from detectron2_train.transfer_head import TransferMaskPredictor
from utils.errors import UserError
from utils.resnets import TinyResNet, load_resnet_weights

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")
MASK_HEADS = ("standard", "agnostic", "transfer")

MODEL_DEFAULTS = {
    "backbone": "resnet50",
    "backbone_weights": "none",  # none | imagenet | PATH
    "norm": "frozen_bn",  # frozen_bn | bn | gn
    "trainable_layers": 3,  # ResNet stages trained, counted from the top (0..5)
    "tiny_widths": [16, 32, 64, 128],
    "fpn_channels": 256,
    "anchor_sizes": [32, 64, 128, 256, 512],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_batch_size_per_image": 256,
    "box_head_dim": 1024,
    "box_batch_size_per_image": 512,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "detections_per_img": 100,
    "mask_head_channels": 256,
    "mask_head_convs": 4,
    "mask_pool_size": 14,
    "mask_head": "standard",  # standard | agnostic | transfer
    "transfer": {
        "input": "cls+box",  # cls | box | cls+box
        "layers": 2,
        "hidden_dim": 1024,
        "activation": "leaky_relu",  # relu | leaky_relu
        "grad": False,  # False = stop-gradient on the box weights (the paper's default)
        "fused_mlp": True,  # add the class-agnostic MLP mask branch
    },
}


def norm_layer_factory(name: str) -> Callable[[int], nn.Module]:
    if name == "frozen_bn":
        return FrozenBatchNorm2d
    if name == "bn":
        return nn.BatchNorm2d
    if name == "gn":
        return lambda channels: nn.GroupNorm(min(32, max(channels // 4, 1)), channels)
    raise UserError(f"model.norm must be frozen_bn, bn or gn, got {name!r}")


def _stage_channels(stage: nn.Sequential) -> int:
    return [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def build_backbone(cfg: dict) -> BackboneWithFPN:
    """ResNet body + FPN (P2-P6), with the lower stages frozen as in detectron2."""
    name, weights = cfg["backbone"], str(cfg["backbone_weights"])
    norm = norm_layer_factory(cfg["norm"])
    if name == "tiny":
        body: nn.Module = TinyResNet(list(cfg["tiny_widths"]), norm)
        if weights != "none":
            raise UserError("the tiny backbone has no pretrained weights; set model.backbone_weights=none")
    elif name in BACKBONES:
        if cfg["norm"] == "gn" and weights != "none":
            raise UserError("pretrained ResNet weights need model.norm frozen_bn or bn, not gn")
        body = getattr(resnet, name)(weights=None, norm_layer=norm)
        if weights != "none":
            load_resnet_weights(body, name, weights)
    else:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    trainable = int(cfg["trainable_layers"])
    if not 0 <= trainable <= 5:
        raise UserError(f"model.trainable_layers must be 0..5, got {trainable}")
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for pname, param in body.named_parameters():
        if not any(pname.startswith(p) for p in train_prefixes):
            param.requires_grad_(False)
    stages = [f"layer{i}" for i in range(1, 5)]
    in_channels = [_stage_channels(getattr(body, s)) for s in stages]
    return BackboneWithFPN(body, {s: str(i) for i, s in enumerate(stages)}, in_channels, int(cfg["fpn_channels"]))


def build_mask_predictor(cfg: dict, num_classes: int) -> nn.Module:
    channels = int(cfg["mask_head_channels"])
    kind = cfg["mask_head"]
    if kind == "standard":
        return MaskRCNNPredictor(channels, channels, num_classes)
    if kind == "agnostic":
        return MaskRCNNPredictor(channels, channels, 1)
    if kind == "transfer":
        t = cfg["transfer"]
        try:
            return TransferMaskPredictor(channels, channels, int(cfg["box_head_dim"]), int(cfg["mask_pool_size"]),
                                         transfer_input=t["input"], num_layers=int(t["layers"]),
                                         hidden_dim=int(t["hidden_dim"]), activation=t["activation"],
                                         transfer_grad=bool(t["grad"]), fused_mlp=bool(t["fused_mlp"]))
        except ValueError as exc:
            raise UserError(f"model.transfer: {exc}") from None
    raise UserError(f"model.mask_head must be one of {', '.join(MASK_HEADS)}, got {kind!r}")


def build_model(cfg: dict, num_classes: int, mask_classes: list[int] | None = None) -> MaskRCNN:
    """Mask R-CNN for `num_classes` foreground classes (contiguous labels 1..num_classes).

    `cfg` is the whole config (sections `model` and `input`). `mask_classes` lists the labels
    with mask supervision (set A); None means all of them.
    """
    m, inp = cfg["model"], cfg["input"]
    backbone = build_backbone(m)
    fpn = backbone.out_channels
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((int(s),) for s in m["anchor_sizes"]),
                              (tuple(float(a) for a in m["aspect_ratios"]),) * len(m["anchor_sizes"]))
    if len(m["anchor_sizes"]) != 5:
        raise UserError("model.anchor_sizes needs one size per FPN level (5)")
    mask_pool = int(m["mask_pool_size"])
    rep = int(m["box_head_dim"])
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(int(s) for s in inp["min_size_train"]),
        max_size=int(inp["max_size_train"]),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=int(m["rpn_pre_nms_top_n_train"]),
        rpn_post_nms_top_n_train=int(m["rpn_post_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(m["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(m["rpn_post_nms_top_n_test"]),
        rpn_batch_size_per_image=int(m["rpn_batch_size_per_image"]),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(fpn * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes + 1),
        box_score_thresh=float(m["box_score_thresh"]),
        box_nms_thresh=float(m["box_nms_thresh"]),
        box_detections_per_img=int(m["detections_per_img"]),
        box_batch_size_per_image=int(m["box_batch_size_per_image"]),
        mask_roi_pool=MultiScaleRoIAlign(levels, mask_pool, 2),
        mask_head=MaskRCNNHeads(fpn, [int(m["mask_head_channels"])] * int(m["mask_head_convs"]), 1),
        mask_predictor=build_mask_predictor(m, num_classes + 1),
    )
    model.roi_heads = MaskRoIHeads.from_roi_heads(model.roi_heads, num_classes + 1, mask_classes)
    return model


def set_image_sizes(model: MaskRCNN, cfg: dict, training: bool) -> None:
    """Multi-scale shorter side for training, a single size for inference (as in detectron2)."""
    inp = cfg["input"]
    if training:
        model.transform.min_size = tuple(int(s) for s in inp["min_size_train"])
        model.transform.max_size = int(inp["max_size_train"])
    else:
        model.transform.min_size = (int(inp["min_size_test"]),)
        model.transform.max_size = int(inp["max_size_test"])
