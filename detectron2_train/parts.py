"""The parts a Mask R-CNN config names, without torch: `model.backbone`, `model.mask_head`, `model.roi_heads` and
`model.stage`. train_net.py's choices and the config schemas (engine.py, affinity_engine.py) are these;
detectron2_train/modeling.py builds them.

A backbone or mask head is a builder plus one `register` line below (utils/registry.py: imported when a model
is built): a backbone builder takes the `model` section and returns the backbone with its FPN (`out_channels`
set, feature maps "0".."3" and "pool"); a mask-head builder takes the `model` section, the number of classes
(background included) and the class names, and returns the mask predictor. RoI heads and stages are modes of
`build_model` itself, listed here once.
"""
from __future__ import annotations

from utils.registry import Registry

BACKBONES = Registry("model.backbone")
BACKBONES.register("resnet18", "detectron2_train.modeling:resnet_fpn", "torchvision ResNet-18 + FPN")
BACKBONES.register("resnet34", "detectron2_train.modeling:resnet_fpn", "torchvision ResNet-34 + FPN")
BACKBONES.register("resnet50", "detectron2_train.modeling:resnet_fpn", "torchvision ResNet-50 + FPN")
BACKBONES.register("resnet101", "detectron2_train.modeling:resnet_fpn", "torchvision ResNet-101 + FPN")
BACKBONES.register("tiny", "detectron2_train.modeling:tiny_resnet_fpn", "a small ResNet + FPN for tests and CPU runs")
BACKBONES.register("vit", "detectron2_train.vit_backbone:build_vit_backbone",
                   "the discovery ViT (DINO/DINOv2, model.vit) under ViTDet's simple feature pyramid")

MASK_HEADS = Registry("model.mask_head")
MASK_HEADS.register("standard", "detectron2_train.modeling:standard_mask_predictor",
                    "class-specific (fully supervised)")
MASK_HEADS.register("agnostic", "detectron2_train.modeling:agnostic_mask_predictor", "class-agnostic")
MASK_HEADS.register("agnostic_mlp", "detectron2_train.modeling:agnostic_mlp_mask_predictor",
                    "class-agnostic + fused MLP")
MASK_HEADS.register("transfer", "detectron2_train.modeling:transfer_mask_predictor", "MaskX R-CNN weight transfer")

ROI_HEADS = ("standard", "cascade")  # Mask R-CNN's, or three box stages (cascade.py)
STAGES = ("e2e", "box", "mask")  # MaskX R-CNN's stage-wise training (modeling.apply_stage)
