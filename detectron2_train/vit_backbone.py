"""A ViT backbone for the detectors: ViTDet's simple feature pyramid (Li et al. 2022) over the last block.

The ViT (utils/vit_features.py: the discovery checkpoint, frozen by default, its tokens optionally
cached) gives a stride-p token map (p = 16, 8 or 14). The pyramid takes it to strides 4, 8, 16 and 32
as ViTDet does from its single stride-16 map: deconvolutions (x4: two 2x2 stride-2 transposed
convolutions with LayerNorm and GELU between; x2: one), identity, max-pooling; each level then a 1x1
and a 3x3 convolution with LayerNorm to `out_channels`, and "pool" (P6) max-pooled from P5 as
torchvision's FPN does. torchvision's RoI pooling and anchors need power-of-two strides, so a stride-14
map (DINOv2) is first resampled to stride 16 (bilinear, pixel-aligned: scale 14/16). The result is
what torchvision's `BackboneWithFPN` gives: an ordered dict "0".."3", "pool" and `out_channels`.

The ViT runs on each image at its own size (not on the padded batch), so the detector must pass its
images' sizes: `attach_image_sizes(model)` has the model's transform hand them over on every forward.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from utils.vit_features import ViTTokenMaps, build_token_maps

PYRAMID_STRIDES = (4, 8, 16, 32)


def _fit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop or zero-pad the bottom and right of a (B, C, h, w) map to (height, width)."""
    x = x[..., :height, :width]
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))


def _rescale(channels: int, factor: float) -> tuple[nn.Module, int]:
    """ViTDet's per-level operation: (module, its output channels) for an up- or down-scaling `factor`."""
    if factor == 4:
        return nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), LayerNorm2d(channels // 2),
                             nn.GELU(), nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2)), channels // 4
    if factor == 2:
        return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), channels // 2
    if factor == 1:
        return nn.Identity(), channels
    if factor in (0.5, 0.25):
        kernel = int(1 / factor)
        return nn.MaxPool2d(kernel, stride=kernel, ceil_mode=True), channels
    raise ValueError(f"no pyramid level at scale {factor}")


class SimpleFeaturePyramid(nn.Module):
    """Stride-p map (B, C, gh, gw) -> {"0": stride 4, "1": 8, "2": 16, "3": 32, "pool": 64}, `out_channels` each."""

    def __init__(self, in_channels: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.base_stride = 2 ** math.ceil(math.log2(patch_size))  # 14 -> 16
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for stride in PYRAMID_STRIDES:
            rescale, channels = _rescale(in_channels, self.base_stride / stride)
            self.stages.append(nn.Sequential(
                rescale,
                nn.Conv2d(channels, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))

    def forward(self, tokens: torch.Tensor, image_shape: tuple[int, int]) -> OrderedDict[str, torch.Tensor]:
        """`tokens` covers the batch's padded images of `image_shape` (H, W) from the top left."""
        height, width = image_shape
        if self.base_stride != self.patch_size:
            # output pixel j samples token (j + 0.5) * base / p - 0.5: the same image point
            tokens = F.interpolate(tokens, scale_factor=self.patch_size / self.base_stride, mode="bilinear",
                                   align_corners=False, recompute_scale_factor=False)
        tokens = _fit(tokens, math.ceil(height / self.base_stride), math.ceil(width / self.base_stride))
        out = OrderedDict()
        for i, (stride, stage) in enumerate(zip(PYRAMID_STRIDES, self.stages)):
            out[str(i)] = _fit(stage(tokens), math.ceil(height / stride), math.ceil(width / stride))
        out["pool"] = F.max_pool2d(out[str(len(PYRAMID_STRIDES) - 1)], 1, 2, 0)  # torchvision's LastLevelMaxPool
        return out


class ViTDetBackbone(nn.Module):
    """ViT token maps + simple feature pyramid, a drop-in for torchvision's BackboneWithFPN."""

    def __init__(self, body: ViTTokenMaps, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.pyramid = SimpleFeaturePyramid(body.channels, body.patch_size, out_channels)
        self.out_channels = out_channels
        self.image_sizes: list[tuple[int, int]] | None = None  # of the batch being run (attach_image_sizes)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        sizes, self.image_sizes = self.image_sizes, None  # this batch's only
        return self.pyramid(self.body(images, sizes), tuple(images.shape[-2:]))


def build_vit_backbone(model_cfg: dict) -> ViTDetBackbone:
    """`model.backbone: vit`: the `model.vit` ViT and a pyramid of `model.fpn_channels` channels."""
    return ViTDetBackbone(build_token_maps(model_cfg["vit"]), int(model_cfg["fpn_channels"]))


def attach_image_sizes(model: GeneralizedRCNN) -> None:
    """Have the detector's transform give its ViTDetBackbone the batch's image sizes (before padding)."""
    backbone = model.backbone

    def hand_over(_module, _inputs, output) -> None:
        backbone.image_sizes = [tuple(size) for size in output[0].image_sizes]

    model.transform.register_forward_hook(hand_over)
