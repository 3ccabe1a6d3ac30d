"""The `model.vit` config section shared by the detectors and the segmenters (`model.backbone: vit`).

Torch-free, so that the scripts' `--help` stays quick. The keys name the same checkpoint as
`gen_masks.py --arch A --patch_size P --weights W`; utils/vit_features.py builds the backbone from them.
"""
from __future__ import annotations

from utils.cli import int_range
from utils.vit_archs import ARCHS, PATCH_SIZES

VIT_DEFAULTS: dict = {
    "arch": "dinov2_vits14",  # a gen_masks.py --arch
    "patch_size": None,  # null: the arch's default (16 for DINO, 14 for DINOv2); DINO also has 8
    "weights": "dino",  # dino (the official checkpoint via torch.hub) | random (smoke tests) | PATH
    "trainable_blocks": 0,  # last ViT blocks trained (and the final norm with them); 0 = frozen
    "cache_dir": None,  # frozen ViT only: memory-mapped cache of its last-block tokens (utils/feature_cache.py)
}


def vit_schema_entries(prefix: str = "model.vit") -> tuple[dict, dict]:
    """(types, ranges) of the `model.vit` keys for a trainer's ConfigSchema."""
    types = {f"{prefix}.patch_size": int, f"{prefix}.cache_dir": str}
    ranges = {f"{prefix}.arch": ARCHS, f"{prefix}.patch_size": PATCH_SIZES,
              f"{prefix}.trainable_blocks": int_range(0)}
    return types, ranges
