"""Build torchvision's Mask R-CNN (FPN) from the `model` section of a config.

Backbones and mask heads are registered by name in detectron2_train/parts.py (a new one is a builder here
plus one line there). Backbones: torchvision ResNets (`resnet50` default, `resnet18/34/101`), `tiny`, a small
ResNet for tests and CPU runs, or `vit`, the discovery ViT under a simple feature pyramid
(`model.vit`, vit_backbone.py). Backbone weights: `none`, `imagenet` (torchvision's official
ImageNet URL) or a path to a torchvision / DINO / MoCo ResNet checkpoint.
Mask heads: `standard` (class-specific, fully supervised), `agnostic` (one mask per box),
`agnostic_mlp` (one mask per box plus the fused MLP branch) or `transfer` (MaskX R-CNN weight
transfer, see transfer_head.py). RoI heads: `standard` (Mask R-CNN) or `cascade` (three box
stages, cascade.py); either can train with DropLoss (droploss.py).
Training stages (`model.stage`, MaskX R-CNN's stage-wise training): `e2e` trains everything;
`box` trains Faster R-CNN (no mask loss, mask branch frozen); `mask` freezes the backbone, the RPN
and the box head and trains only the mask branch (and the transfer function).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from detectron2_train.cascade import AgnosticBoxPredictor, CascadeRoIHeads
from detectron2_train.parts import BACKBONES, MASK_HEADS, ROI_HEADS, STAGES
from detectron2_train.roi_heads import MaskRoIHeads
from detectron2_train.transfer_head import (AgnosticMLPMaskPredictor, TransferMaskPredictor, random_class_vectors,
                                            read_class_embeddings)
from utils.errors import UserError
from utils.resnets import TinyResNet, load_resnet_weights
from utils.vit_settings import VIT_DEFAULTS

MASK_BRANCH = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")  # state-dict prefixes of the mask branch
# Frozen in stage `mask`: trained parameters, and the modules kept in eval mode (their norm layers'
# statistics must not move). The RPN module itself stays in training mode so that proposals use the
# training settings; its head has no normalisation.
BOX_DETECTOR = ("backbone", "rpn", "roi_heads.box_head", "roi_heads.box_predictor")
BOX_DETECTOR_EVAL = ("backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor")

MODEL_DEFAULTS = {
    "backbone": "resnet50",
    "backbone_weights": "none",  # none | imagenet | PATH
    "norm": "frozen_bn",  # frozen_bn | bn | syncbn | gn
    "fpn_norm": False,  # also normalise the FPN's convolutions with model.norm
    "trainable_layers": 3,  # ResNet stages trained, counted from the top (0..5)
    "tiny_widths": [16, 32, 64, 128],
    "fpn_channels": 256,
    "vit": dict(VIT_DEFAULTS),  # backbone vit: the ViT (utils/vit_settings.py)
    "anchor_sizes": [32, 64, 128, 256, 512],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_batch_size_per_image": 256,
    "rpn_nms_thresh": 0.7,
    "box_head_dim": 1024,
    "box_batch_size_per_image": 512,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "box_score": "class",  # class: per-class scores and NMS (torchvision's) | object: 1 - p(background), one NMS
    "detections_per_img": 100,
    "mask_head_channels": 256,
    "mask_head_convs": 4,
    "mask_pool_size": 14,
    "mask_head": "standard",  # standard | agnostic | agnostic_mlp | transfer
    "roi_heads": "standard",  # standard | cascade
    "cascade_ious": [0.5, 0.6, 0.7],  # one box stage per IoU threshold
    "droploss": False,  # CutLER's DropLoss: no loss for RoIs that overlap no (pseudo) GT box
    "droploss_iou": 0.01,  # ... max IoU <= this
    "stage": "e2e",  # e2e | box (Faster R-CNN only) | mask (frozen detector, mask branch only)
    "transfer": {
        "input": "cls+box",  # cls | box | cls+box | randn | embedding
        "randn_dim": 300,  # input randn: length of the fixed Gaussian class vectors
        "randn_seed": 0,  # input randn: their seed
        "embedding_file": None,  # input embedding: text file, one `name v1 ... vD` line per class
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
    if name == "syncbn":  # statistics over all processes under torchrun (plain BatchNorm in one process)
        return nn.SyncBatchNorm
    if name == "gn":
        return lambda channels: nn.GroupNorm(min(32, max(channels // 4, 1)), channels)
    raise UserError(f"model.norm must be frozen_bn, bn, syncbn or gn, got {name!r}")


def _stage_channels(stage: nn.Sequential) -> int:
    return [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def build_backbone(cfg: dict) -> nn.Module:
    """The backbone with its FPN that `cfg["backbone"]` names (a builder of detectron2_train/parts.py)."""
    return BACKBONES.load(cfg["backbone"])(cfg)


def tiny_resnet_fpn(cfg: dict) -> BackboneWithFPN:
    norm = norm_layer_factory(cfg["norm"])
    if str(cfg["backbone_weights"]) != "none":
        raise UserError("the tiny backbone has no pretrained weights; set model.backbone_weights=none")
    return resnet_with_fpn(TinyResNet(list(cfg["tiny_widths"]), norm), cfg, norm)


def resnet_fpn(cfg: dict) -> BackboneWithFPN:
    """torchvision's ResNet of that name (`resnet50`, ...), with `model.backbone_weights`."""
    name, weights = cfg["backbone"], str(cfg["backbone_weights"])
    norm = norm_layer_factory(cfg["norm"])
    if cfg["norm"] == "gn" and weights != "none":
        raise UserError("pretrained ResNet weights need model.norm frozen_bn or bn, not gn")
    body = getattr(resnet, name)(weights=None, norm_layer=norm)
    if weights != "none":
        load_resnet_weights(body, name, weights)
    return resnet_with_fpn(body, cfg, norm)


def resnet_with_fpn(body: nn.Module, cfg: dict, norm: Callable[[int], nn.Module]) -> BackboneWithFPN:
    """ResNet body + FPN (P2-P6), with the lower stages frozen as in detectron2."""
    trainable = int(cfg["trainable_layers"])
    if not 0 <= trainable <= 5:
        raise UserError(f"model.trainable_layers must be 0..5, got {trainable}")
    train_prefixes = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable] + (["bn1"] if trainable == 5 else [])
    for pname, param in body.named_parameters():
        if not any(pname.startswith(p) for p in train_prefixes):
            param.requires_grad_(False)
    stages = [f"layer{i}" for i in range(1, 5)]
    in_channels = [_stage_channels(getattr(body, s)) for s in stages]
    return BackboneWithFPN(body, {s: str(i) for i, s in enumerate(stages)}, in_channels, int(cfg["fpn_channels"]),
                           norm_layer=norm if cfg["fpn_norm"] else None)


def transfer_class_vectors(cfg: dict, num_classes: int, class_names: list[str] | None) -> torch.Tensor | None:
    """The fixed class vectors of the `randn` and `embedding` transfer inputs (background row first)."""
    t = cfg["transfer"]
    if t["input"] == "randn":
        return random_class_vectors(num_classes, int(t["randn_dim"]), int(t["randn_seed"]))
    if t["input"] == "embedding":
        if not t.get("embedding_file"):
            raise UserError("model.transfer.input embedding needs model.transfer.embedding_file "
                            "(a text file with one `name v1 v2 ...` line per class)")
        if class_names is None:
            raise UserError("model.transfer.input embedding needs the class names of the dataset")
        return read_class_embeddings(t["embedding_file"], class_names)
    return None


def build_mask_predictor(cfg: dict, num_classes: int, class_names: list[str] | None = None) -> nn.Module:
    """The mask predictor that `cfg["mask_head"]` names (a builder of detectron2_train/parts.py)."""
    return MASK_HEADS.load(cfg["mask_head"])(cfg, num_classes, class_names)


def standard_mask_predictor(cfg: dict, num_classes: int, class_names: list[str] | None) -> nn.Module:
    return MaskRCNNPredictor(int(cfg["mask_head_channels"]), int(cfg["mask_head_channels"]), num_classes)


def agnostic_mask_predictor(cfg: dict, num_classes: int, class_names: list[str] | None) -> nn.Module:
    return MaskRCNNPredictor(int(cfg["mask_head_channels"]), int(cfg["mask_head_channels"]), 1)


def agnostic_mlp_mask_predictor(cfg: dict, num_classes: int, class_names: list[str] | None) -> nn.Module:
    channels = int(cfg["mask_head_channels"])
    return AgnosticMLPMaskPredictor(channels, channels, int(cfg["mask_pool_size"]))


def transfer_mask_predictor(cfg: dict, num_classes: int, class_names: list[str] | None) -> nn.Module:
    channels, t = int(cfg["mask_head_channels"]), cfg["transfer"]
    if cfg["roi_heads"] == "cascade" and t["input"] in ("box", "cls+box"):
        raise UserError(f"model.transfer.input {t['input']} reads class-specific box weights, but the cascade "
                        f"heads regress boxes class-agnostically; use cls, randn or embedding")
    try:
        return TransferMaskPredictor(channels, channels, int(cfg["box_head_dim"]), int(cfg["mask_pool_size"]),
                                     transfer_input=t["input"], num_layers=int(t["layers"]),
                                     hidden_dim=int(t["hidden_dim"]), activation=t["activation"],
                                     transfer_grad=bool(t["grad"]), fused_mlp=bool(t["fused_mlp"]),
                                     class_vectors=transfer_class_vectors(cfg, num_classes, class_names))
    except ValueError as exc:
        raise UserError(f"model.transfer: {exc}") from None


class StagedMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN whose frozen parts (model.stage) stay frozen in training mode.

    `frozen_eval` names submodules kept in eval mode whatever `train()` is asked for, so that
    frozen norm layers keep their statistics. In stage `mask`, `load_state_dict` takes the mask
    branch from the weights only when all of it fits (the box stage may have been trained with
    another mask head, which it never used); every other key must fit as usual.
    """

    stage = "e2e"
    frozen_eval: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> "StagedMaskRCNN":
        super().train(mode)
        for name in self.frozen_eval:
            self.get_submodule(name).eval()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.stage != "mask" or not strict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        own = self.state_dict()
        mask_keys = {k for k in set(own) | set(state_dict) if k.startswith(MASK_BRANCH)}
        if all(k in own and k in state_dict and own[k].shape == state_dict[k].shape for k in mask_keys):
            return super().load_state_dict(state_dict, strict=True, assign=assign)
        result = super().load_state_dict({k: v for k, v in state_dict.items() if k not in mask_keys},
                                         strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in mask_keys]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:3]}, "
                               f"unexpected keys {result.unexpected_keys[:3]}")
        return result


def apply_stage(model: StagedMaskRCNN, stage: str) -> None:
    """Freeze what `stage` (one of STAGES) does not train: requires_grad False, eval mode where it matters."""
    model.stage = stage
    if stage == "box":
        frozen = ("roi_heads.mask_head", "roi_heads.mask_predictor")
        model.roi_heads.mask_loss_on = False
        model.frozen_eval = frozen
    elif stage == "mask":
        frozen = BOX_DETECTOR
        model.frozen_eval = BOX_DETECTOR_EVAL
    else:
        return
    for name in frozen:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(False)
    model.train(model.training)


def build_model(cfg: dict, num_classes: int, mask_classes: list[int] | None = None,
                class_names: list[str] | None = None) -> StagedMaskRCNN:
    """Mask R-CNN for `num_classes` foreground classes (contiguous labels 1..num_classes).

    `cfg` is the whole config (sections `model` and `input`). `mask_classes` lists the labels
    with mask supervision (set A); None means all of them. `class_names` (label order) are needed
    by the `embedding` transfer input only.
    """
    m, inp = cfg["model"], cfg["input"]
    if m["roi_heads"] not in ROI_HEADS:
        raise UserError(f"model.roi_heads must be one of {', '.join(ROI_HEADS)}, got {m['roi_heads']!r}")
    if m["stage"] not in STAGES:
        raise UserError(f"model.stage must be one of {', '.join(STAGES)}, got {m['stage']!r}")
    if len(m["anchor_sizes"]) != 5:
        raise UserError("model.anchor_sizes needs one size per FPN level (5)")
    backbone = build_backbone(m)
    fpn = backbone.out_channels
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((int(s),) for s in m["anchor_sizes"]),
                              (tuple(float(a) for a in m["aspect_ratios"]),) * len(m["anchor_sizes"]))
    mask_pool = int(m["mask_pool_size"])
    rep = int(m["box_head_dim"])
    cascade = m["roi_heads"] == "cascade"
    if cascade:
        ious = [float(v) for v in m["cascade_ious"]]
        if not ious or any(not 0 < v < 1 for v in ious):
            raise UserError(f"model.cascade_ious must be IoU thresholds in (0, 1), got {m['cascade_ious']}")
        stage_heads = [TwoMLPHead(fpn * 7 * 7, rep) for _ in ious]
        stage_predictors = [AgnosticBoxPredictor(rep, num_classes + 1) for _ in ious]
        box_head, box_predictor = stage_heads[0], stage_predictors[0]
    else:
        box_head, box_predictor = TwoMLPHead(fpn * 7 * 7, rep), FastRCNNPredictor(rep, num_classes + 1)
    model = StagedMaskRCNN(
        backbone,
        num_classes=None,
        min_size=tuple(int(s) for s in inp["min_size_train"]),
        max_size=int(inp["max_size_train"]),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=int(m["rpn_pre_nms_top_n_train"]),
        rpn_post_nms_top_n_train=int(m["rpn_post_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(m["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(m["rpn_post_nms_top_n_test"]),
        rpn_nms_thresh=float(m["rpn_nms_thresh"]),
        rpn_batch_size_per_image=int(m["rpn_batch_size_per_image"]),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=box_head,
        box_predictor=box_predictor,
        box_score_thresh=float(m["box_score_thresh"]),
        box_nms_thresh=float(m["box_nms_thresh"]),
        box_detections_per_img=int(m["detections_per_img"]),
        box_batch_size_per_image=int(m["box_batch_size_per_image"]),
        mask_roi_pool=MultiScaleRoIAlign(levels, mask_pool, 2),
        mask_head=MaskRCNNHeads(fpn, [int(m["mask_head_channels"])] * int(m["mask_head_convs"]), 1),
        mask_predictor=build_mask_predictor(m, num_classes + 1, class_names),
    )
    droploss_iou = float(m["droploss_iou"]) if m["droploss"] else None
    if cascade:
        model.roi_heads = CascadeRoIHeads.from_roi_heads(model.roi_heads, num_classes + 1, mask_classes, droploss_iou,
                                                         box_score=m["box_score"], stage_heads=stage_heads,
                                                         stage_predictors=stage_predictors, stage_ious=ious)
    else:
        model.roi_heads = MaskRoIHeads.from_roi_heads(model.roi_heads, num_classes + 1, mask_classes, droploss_iou,
                                                      box_score=m["box_score"])
    if m["backbone"] == "vit":
        from detectron2_train.vit_backbone import attach_image_sizes

        attach_image_sizes(model)
    apply_stage(model, m["stage"])
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
