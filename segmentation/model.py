"""DeepLab-v3 from torchvision building blocks: a (dilated) ResNet or a ViT backbone and the ASPP head.

`build_deeplab(backbone="resnet50", output_stride=8)` is the paper's model: ResNet-50 with the last two
stages dilated (output stride 8) and torchvision's `DeepLabHead`. `resnet18` and `tiny` are small
backbones for tests; their BasicBlocks cannot dilate, so output strides below 32 drop the strides of
the last stages instead. `vit` is the discovery ViT (`model.vit`, utils/vit_features.py): the ASPP head
sits on its last-block token map, at the patch stride (16, 8 or 14; `model.output_stride` does not apply).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from utils.errors import UserError
from segmentation.settings import BACKBONES
from utils.resnets import TinyResNet, load_resnet_weights
from utils.vit_settings import VIT_DEFAULTS



class DeepLabV3(nn.Module):
    """Backbone -> ASPP head -> logits upsampled to the input size.

    `head[:4]` gives the pixel embeddings (after ASPP and the 3x3 conv); `head[4]` is the 1x1 classifier,
    the only layer the linear probe trains.
    """

    def __init__(self, backbone: nn.Module, head: nn.Sequential, output_stride: int, pads_to_stride: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output_stride = output_stride
        # the features cover the image padded to a multiple of output_stride (a ViT's patches)
        self.pads_to_stride = pads_to_stride

    @property
    def classifier(self) -> nn.Conv2d:
        return self.head[4]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings at 1/output_stride resolution, shape (B, C, h, w)."""
        features = self.backbone(images)["out"]
        for layer in list(self.head)[:4]:  # slicing DeepLabHead itself would call its constructor
            features = layer(features)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.embed(images))
        height, width = images.shape[-2:]
        if self.pads_to_stride:
            covered = (logits.shape[-2] * self.output_stride, logits.shape[-1] * self.output_stride)
            return F.interpolate(logits, size=covered, mode="bilinear", align_corners=False)[..., :height, :width]
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)


class ViTFeatureMap(nn.Module):
    """The ViT's token map as DeepLab's backbone output: {"out": (B, D, ceil(H / p), ceil(W / p))}."""

    def __init__(self, vit_cfg: dict) -> None:
        super().__init__()
        from utils.vit_features import build_token_maps  # timm: only when asked for

        self.body = build_token_maps(vit_cfg)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(images)}


def _resnet_body(name: str, output_stride: int) -> tuple[nn.Module, int]:
    if output_stride not in (8, 16, 32):
        raise UserError(f"model.output_stride must be 8, 16 or 32, not {output_stride}")
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    if name in ("resnet50", "resnet101"):
        net = getattr(resnet, name)(weights=None, replace_stride_with_dilation=dilate)
        return net, 2048
    if name == "resnet18":
        net = resnet.resnet18(weights=None)
    elif name == "tiny":
        net = TinyResNet()
    else:
        raise UserError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    for layer, drop in zip((net.layer3, net.layer4), dilate[1:]):
        if drop:  # keep the resolution without dilation (BasicBlock does not support it)
            layer[0].conv1.stride = (1, 1)
            if layer[0].downsample is not None:
                layer[0].downsample[0].stride = (1, 1)
    return net, net.layer4[-1].conv2.out_channels


def _head(in_channels: int, num_classes: int, channels: int, atrous_rates: list[int]) -> nn.Sequential:
    if channels == 256:
        return DeepLabHead(in_channels, num_classes, atrous_rates)
    # Same layout as DeepLabHead (so state dicts line up), with a narrower ASPP for small models.
    return nn.Sequential(
        ASPP(in_channels, atrous_rates, channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
    )


def build_deeplab(num_classes: int = 21, backbone: str = "resnet50", output_stride: int = 8,
                  weights: str | None = "none", head_channels: int = 256,
                  atrous_rates: list[int] | None = None) -> DeepLabV3:
    """DeepLab-v3 with a ResNet backbone; `weights` initialises the backbone only."""
    body, channels = _resnet_body(backbone, output_stride)
    load_resnet_weights(body, backbone, weights)
    rates = list(atrous_rates) if atrous_rates else ([12, 24, 36] if output_stride == 8 else [6, 12, 18])
    return DeepLabV3(IntermediateLayerGetter(body, {"layer4": "out"}),
                     _head(channels, num_classes, head_channels, rates), output_stride)


def build_vit_deeplab(vit_cfg: dict, num_classes: int, head_channels: int = 256,
                      atrous_rates: list[int] | None = None) -> DeepLabV3:
    """DeepLab-v3's ASPP head over the last-block token map of the `model.vit` ViT."""
    body = ViTFeatureMap(vit_cfg)
    rates = list(atrous_rates) if atrous_rates else [6, 12, 18]  # the paper's rates at output stride 16
    return DeepLabV3(body, _head(body.body.channels, num_classes, head_channels, rates), body.body.patch_size,
                     pads_to_stride=True)


def build_from_config(config: dict) -> DeepLabV3:
    """The model described by a config's `model` section and `data.num_classes`."""
    m = config.get("model", {})
    if m.get("backbone") == "vit":
        return build_vit_deeplab({**VIT_DEFAULTS, **m.get("vit", {})}, int(config["data"]["num_classes"]),
                                 int(m.get("head_channels", 256)), m.get("atrous_rates"))
    return build_deeplab(num_classes=int(config["data"]["num_classes"]), backbone=m.get("backbone", "resnet50"),
                         output_stride=int(m.get("output_stride", 8)), weights=m.get("weights", "none"),
                         head_channels=int(m.get("head_channels", 256)), atrous_rates=m.get("atrous_rates"))
