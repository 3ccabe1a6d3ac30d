"""Pairwise-affinity (PA) predictor of GGN: model, target, loss and data (Wang et al., CVPR 2022).

The predictor learns, from the instance masks of the seen classes, whether neighbouring pixels
belong to the same object; grouping its map (distill/grouping.py) gives masks of any class.

- Model: a torchvision ResNet + FPN (modeling.build_backbone: the same backbones, weights, norms
  and `tiny` test backbone as Mask R-CNN) and an UperNet-style head: P2-P5 each through a 3x3
  conv, upsampled to stride 4, concatenated, fused by a 3x3 conv and a 1x1 conv to one logit,
  upsampled bilinearly to the input size. GGN uses UperNet's head (with a pyramid pooling module
  on C5) on a ResNet-50; here the FPN's top-down path takes that role. Optional (`fine_channels` > 0,
  not in GGN): a stride-2 branch on the image predicts instead, from its own features and the head's;
  small images (the tiny CPU configs) need it, as a stride-4 map blurs their 2-pixel boundaries.
- Target (utils/affinity.py): the fraction of the 8 neighbours at distance 1 in the same
  instance, background counting as one instance; `loss_mask` leaves out pixels whose 8 pairs
  are all background-background.
- Loss: sigmoid BCE against the soft target with GGN's positive weight 0.05 (the positive term
  is down-weighted: most pairs are "same"), averaged over each image's loss mask, then over images.
- Data: `AffinityDataset` reads a COCO JSON (optionally only some categories, e.g. the VOC classes
  as seen classes) with the conventions of detectron2_train/data.py: images are float (3, H, W)
  in [0, 1], flips and scales are seeded by (seed, sample position) for an exact resume.
The trainer is detectron2_train/affinity_engine.py (train_affinity.py).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2_train.data import CocoInstances
from detectron2_train.modeling import build_backbone, norm_layer_factory
from utils.affinity import instance_label_map, pairwise_affinity
from utils.checkpoint import read_torch_file, require_checkpoint_kind
from utils.errors import UserError
from utils.images import IMAGENET_MEAN, IMAGENET_STD

PA_KIND = "pa_predictor"  # the fingerprint kind of train_affinity.py's checkpoints
POSITIVE_WEIGHT = 0.05  # GGN's `class_weight=[0.05]` of its sigmoid cross-entropy: pos_weight
SIZE_DIVISIBILITY = 32

AFFINITY_MODEL_DEFAULTS = {
    "backbone": "resnet50",  # resnet18/34/50/101 or tiny (tests)
    "backbone_weights": "none",  # none | imagenet | PATH (GGN starts from torchvision's ImageNet ResNet-50)
    "norm": "frozen_bn",  # frozen_bn | bn | gn (backbone)
    "trainable_layers": 5,  # GGN trains every stage
    "tiny_widths": [16, 32, 64, 128],
    "fpn_channels": 256,
    "fpn_norm": False,  # also normalise the FPN convolutions with model.norm (build_backbone)
    "head_channels": 128,
    "head_norm": "gn",  # bn | gn (head)
    "fine_channels": 0,  # > 0: a full-resolution branch on the image refines the stride-4 map (not in GGN)
}
AFFINITY_INPUT_DEFAULTS = {  # shorter side (0: the image's own size), capped by the longer side
    "min_size_train": [0],  # GGN trains and infers at the original COCO resolution
    "max_size_train": 1333,
    "min_size_test": 0,
    "max_size_test": 1333,
    "hflip_prob": 0.5,
}


# ----------------------------------------------------------------------------- model


class AffinityHead(nn.Module):
    """UperNet-style fusion of FPN levels into one PA logit map at the resolution of the first level
    (`fused`: the features before the last 1x1 convolution, which a head without `predict` lacks)."""

    def __init__(self, in_channels: int, channels: int, num_levels: int, norm: str, predict: bool = True):
        super().__init__()
        make_norm = norm_layer_factory(norm)

        def conv_norm_relu(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), make_norm(cout), nn.ReLU(inplace=True))

        self.levels = nn.ModuleList(conv_norm_relu(in_channels, channels) for _ in range(num_levels))
        self.fuse = conv_norm_relu(num_levels * channels, channels)
        self.predict = nn.Conv2d(channels, 1, 1) if predict else None

    def fused(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        fused = [conv(f) if i == 0 else F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
                 for i, (conv, f) in enumerate(zip(self.levels, features))]
        return self.fuse(torch.cat(fused, dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.predict is None:
            raise RuntimeError("this head has no prediction layer (the fine branch predicts): call fused()")
        return self.predict(self.fused(features))


class FineBranch(nn.Module):
    """A stride-2 prediction (not in GGN): two 3x3 convolutions on the image (the first with stride 2),
    concatenated with the head's fused stride-4 features upsampled to stride 2, and a 3x3 convolution to
    one logit. The stride-4 map blurs a boundary over 4 pixels; this puts it back on the image's edges."""

    def __init__(self, channels: int, coarse_channels: int, norm: str):
        super().__init__()
        make_norm = norm_layer_factory(norm)
        self.image = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False), make_norm(channels),
                                   nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                   make_norm(channels), nn.ReLU(inplace=True))
        self.predict = nn.Conv2d(channels + coarse_channels, 1, 3, padding=1)

    def forward(self, image: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        fine = self.image(image)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.predict(torch.cat([fine, coarse], dim=1))


class AffinityNet(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> PA logits (B, H, W); sigmoid gives the PA map."""

    def __init__(self, cfg: dict):
        super().__init__()
        cfg = {**AFFINITY_MODEL_DEFAULTS, **cfg}
        if cfg["head_norm"] not in ("bn", "gn"):
            raise UserError(f"model.head_norm must be bn or gn, got {cfg['head_norm']!r}")
        self.backbone = build_backbone(cfg)
        fine = int(cfg["fine_channels"])
        self.head = AffinityHead(self.backbone.out_channels, int(cfg["head_channels"]), 4, cfg["head_norm"],
                                 predict=fine == 0)  # DDP refuses parameters that get no gradient
        self.fine = FineBranch(fine, int(cfg["head_channels"]), cfg["head_norm"]) if fine > 0 else None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = (images - self.pixel_mean) / self.pixel_std
        features = self.backbone(normalised)
        levels = [features[level] for level in ("0", "1", "2", "3")]  # P2..P5
        logits = self.fine(normalised, self.head.fused(levels)) if self.fine is not None else self.head(levels)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def build_affinity_model(model_cfg: dict) -> AffinityNet:
    return AffinityNet(model_cfg)


# ----------------------------------------------------------------------------- loss


def affinity_loss(logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor,
                  pos_weight: float = POSITIVE_WEIGHT) -> torch.Tensor:
    """GGN's PA loss: BCE-with-logits against the soft target, the positive term weighted by
    `pos_weight`, averaged over each image's loss mask (an image without objects adds 0), then
    over the batch. All inputs are (B, H, W)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none",
                                                   pos_weight=logits.new_tensor(pos_weight, dtype=torch.float32))
    mask = loss_mask.float()
    per_image = (per_pixel * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
    return per_image.mean()


# ----------------------------------------------------------------------------- data


def scaled_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `min_size` (0: unchanged) and the longer side at most `max_size`."""
    scale = 1.0 if min_size <= 0 else min_size / min(height, width)
    if max_size > 0 and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class AffinityDataset(CocoInstances):
    """COCO instances -> `(image, {"affinity", "loss_mask", "image_id"})`, targets at the image's scale.

    `category_ids` keeps only the instances of those categories (the seen classes); by default
    images left without one are dropped (`filter_empty`). The shorter side is drawn from
    `min_sizes` (seeded by (seed, position); the first size when the index has no position).
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike,
                 category_ids: Sequence[int] | None = None, min_sizes: Sequence[int] = (0,), max_size: int = 1333,
                 flip_prob: float = 0.0, seed: int = 0, filter_empty: bool = True):
        super().__init__(json_path, image_root, class_agnostic=True, flip_prob=flip_prob, seed=seed)
        if category_ids is not None:
            keep = set(int(c) for c in category_ids)
            self.anns_by_image = {image_id: [a for a in anns if a.get("category_id") in keep]
                                  for image_id, anns in self.anns_by_image.items()}
        if filter_empty:
            self.images = [img for img in self.images if self.anns_by_image.get(img["id"])]
            if not self.images:
                raise UserError(f"{json_path}: no image has an instance of the training categories")
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        image, target = super().__getitem__(item)
        position = item[1] if isinstance(item, tuple) else None
        choice = 0 if position is None else int(np.random.default_rng([self.seed, position, 1]).integers(len(self.min_sizes)))
        height, width = scaled_size(image.shape[1], image.shape[2], self.min_sizes[choice], self.max_size)
        if (height, width) != tuple(image.shape[1:]):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp_(0, 1)
        masks = target["masks"]
        if masks.shape[0] and tuple(masks.shape[1:]) != (height, width):
            masks = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0]
        labels = instance_label_map(masks.numpy() > 0.5, height, width)
        pa, loss_mask = pairwise_affinity(labels)
        return image, {"affinity": torch.from_numpy(pa), "loss_mask": torch.from_numpy(loss_mask),
                       "image_id": target["image_id"]}


def pad_images(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, H, W) tensors -> (B, C, H', W'), zero-padded at the bottom and right to a common size
    that is a multiple of 32."""
    height = math.ceil(max(t.shape[-2] for t in tensors) / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    width = math.ceil(max(t.shape[-1] for t in tensors) / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
    out = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], height, width))
    for k, t in enumerate(tensors):
        out[k, :, :t.shape[-2], :t.shape[-1]] = t
    return out


def collate_affinity(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
    """A padded batch: images (B, 3, H, W) and targets (B, H, W); padding is outside every loss mask."""
    images, targets = zip(*batch)
    return pad_images(images), {
        "affinity": pad_images([t["affinity"][None] for t in targets])[:, 0],
        "loss_mask": pad_images([t["loss_mask"][None] for t in targets])[:, 0],
        "image_ids": [t["image_id"] for t in targets],
    }


# ----------------------------------------------------------------------------- inference


@torch.inference_mode()
def predict_affinity(model: AffinityNet, image: torch.Tensor, min_size: int = 0, max_size: int = 1333) -> np.ndarray:
    """PA map (H, W) float32 in [0, 1] of one image (3, H, W) in [0, 1], on the model's device:
    scaled as in training, padded to a multiple of 32, resized back to the image's size."""
    height, width = image.shape[1:]
    device = next(model.parameters()).device
    h, w = scaled_size(height, width, min_size, max_size)
    scaled = image.to(device)[None]
    if (h, w) != (height, width):
        scaled = F.interpolate(scaled, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    pa = torch.sigmoid(model(pad_images([scaled[0]]))[:, :h, :w].float())
    if (h, w) != (height, width):
        pa = F.interpolate(pa[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return pa[0].cpu().numpy().astype(np.float32)


def load_affinity_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[AffinityNet, dict]:
    """(model in eval mode, config) from a training checkpoint (`model` and `config` entries)."""
    state = read_torch_file(path, "PA checkpoint", hint="pass a checkpoint of train_affinity.py, or 'oracle'")
    require_checkpoint_kind(state, path, (PA_KIND,))
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config or "model" not in state:
        raise UserError(f"PA checkpoint {path} has no 'model' weights and 'config' with a 'model' section")
    model = build_affinity_model({**config["model"], "backbone_weights": "none"})
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"PA checkpoint {path} does not fit its own model config: "
                        f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), config
