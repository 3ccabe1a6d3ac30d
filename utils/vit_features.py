"""The last-block tokens of a DINO/DINOv2 ViT as a feature map, for detectors and segmenters.

`ViTTokenMaps` runs the same ViT, loaded from the same checkpoint file, as `gen_masks.py --arch A
--weights W` (utils/vit.py) on each image of a padded batch at the image's own size (padded with zeros,
the mean colour after normalisation, to a multiple of the patch), and lays the per-image token maps out
on the batch's grid: (B, D, ceil(H / p), ceil(W / p)), zeros outside each image. So an image's tokens do
not depend on what it is batched with, and a frozen ViT's tokens can be cached per image
(utils/feature_cache.py, keyed by the exact input tensor: content, size, flip). With
`trainable_blocks` k > 0 the last k blocks and the final norm train; the rest never gets a gradient.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.feature_cache import FeatureCache
from utils.fingerprint import file_digest
from utils.vit import build_vit
from utils.vit_archs import backbone_spec, resolve_patch_size

TOKENS_LAYER = "last block, final norm; CLS and registers dropped"


def weights_identity(arch: str, patch_size: int, weights: str) -> str:
    """What names the checkpoint in a cache key: the SHA-256 of its file (`dino`: the torch.hub copy)."""
    if weights == "random":
        return "random (seed 0)"
    if weights == "dino":
        url = backbone_spec(arch).urls[patch_size]
        weights = str(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name)
    return "sha256:" + file_digest(weights)


class ViTTokenMaps(nn.Module):
    """Image batch (B, 3, H, W), normalised, with per-image sizes -> token map (B, D, ceil(H/p), ceil(W/p))."""

    def __init__(self, arch: str, patch_size: int | None = None, weights: str = "dino", trainable_blocks: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        patch_size = resolve_patch_size(arch, patch_size)
        self.vit = build_vit(arch, patch_size, weights)
        depth = len(self.vit.vit.blocks)
        if not 0 <= trainable_blocks <= depth:
            raise UserError(f"model.vit.trainable_blocks must be 0..{depth} for {arch}, got {trainable_blocks}")
        if trainable_blocks and cache_dir:
            raise UserError("model.vit.cache_dir caches a frozen ViT's tokens: it needs model.vit.trainable_blocks 0, "
                            f"not {trainable_blocks}")
        self.patch_size, self.channels = patch_size, self.vit.vit.embed_dim
        self.frozen_blocks = depth - trainable_blocks
        trained = [f"blocks.{i}." for i in range(self.frozen_blocks, depth)] + ["norm."] if trainable_blocks else []
        for name, param in self.vit.vit.named_parameters():
            param.requires_grad_(any(name.startswith(p) for p in trained))
        self.cache = FeatureCache(cache_dir, {"arch": arch, "patch_size": patch_size, "layer": TOKENS_LAYER,
                                              "weights": weights_identity(arch, patch_size, weights)}) \
            if cache_dir else None

    def train(self, mode: bool = True) -> "ViTTokenMaps":
        super().train(mode)
        self.vit.eval()  # no dropout or drop-path in the DINO models; the tokens are the discovery ones
        return self

    def _compute(self, image: torch.Tensor) -> torch.Tensor:
        """(gh, gw, D) tokens of one image (3, h, w), h and w multiples of the patch."""
        tokens = self.vit.output_tokens(image[None], no_grad_blocks=self.frozen_blocks)[0, 1:]
        return tokens.reshape(image.shape[1] // self.patch_size, image.shape[2] // self.patch_size, -1)

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(ceil(h/p), ceil(w/p), D) tokens of one normalised image (3, h, w), padded with zeros to the patch."""
        p = self.patch_size
        h, w = image.shape[-2:]
        image = F.pad(image, (0, -w % p, 0, -h % p))
        if self.cache is not None:
            return self.cache.fetch(image, self._compute)
        return self._compute(image)

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        b, _, height, width = images.shape
        sizes = image_sizes or [(height, width)] * b
        if len(sizes) != b:
            raise ValueError(f"{len(sizes)} image sizes for a batch of {b}")
        grid_h, grid_w = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        maps = []
        for image, (h, w) in zip(images, sizes):
            tokens = self.image_tokens(image[:, :h, :w]).permute(2, 0, 1)
            maps.append(F.pad(tokens, (0, grid_w - tokens.shape[2], 0, grid_h - tokens.shape[1])))
        return torch.stack(maps)


def build_token_maps(vit_cfg: dict) -> ViTTokenMaps:
    """The backbone of a config's `model.vit` section (utils/vit_settings.py)."""
    return ViTTokenMaps(vit_cfg["arch"], vit_cfg.get("patch_size"), str(vit_cfg["weights"]),
                        int(vit_cfg["trainable_blocks"]), vit_cfg.get("cache_dir"))
