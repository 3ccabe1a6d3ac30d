"""The ViT backbones of `--arch`: one row of `BACKBONES` each, the one source of every `--arch` choice list
and help text (`ARCHS`, `archs_by_family`). No torch here, so that --help can read it; utils/vit.py builds
the models.

* DINO (`vit_small`, `vit_base`; patch 8 or 16): the official checkpoints use timm's key layout
  (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
  mlp.fc1,mlp.fc2}.*`, `norm.*`, no head).
* DINOv2 (`dinov2_vits14`, `dinov2_vitb14`, and `_reg` with 4 register tokens; patch 14): the
  official `torch.hub` files add `blocks.N.ls{1,2}.gamma` (layer scale), `mask_token` [1, D] and,
  for `_reg`, `register_tokens` [1, 4, D]; `pos_embed` is [1, 1 + 37², D] and holds no register
  positions. timm's `vit_*_patch14_dinov2` has every key but those two, which are added to it, so
  every official file loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    """One `--arch`: its timm model, official weights and position-embedding resampling."""

    family: str  # "DINO" or "DINOv2", for messages
    timm_name: str  # with `{p}` for the patch size
    patch_sizes: tuple[int, ...]  # the first is the default
    urls: dict[int, str]  # patch size -> official checkpoint
    register_tokens: int = 0
    interpolate_offset: float = 0.1  # DINO's kludge: scale factor (n + offset) / sqrt(N); 0 -> output size
    interpolate_antialias: bool = False
    mask_token: bool = False  # the official file holds `mask_token` (unused at inference)
    features: str = "raw"  # what the discovery methods read by default (distill/features.py)
    timm_kwargs: tuple[tuple[str, object], ...] = ()  # overrides of timm's model arguments (tests: tiny models)


_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
# Official releases: facebookresearch/dino README "Pretrained models"; facebookresearch/dinov2
# dinov2/hub/backbones.py (`_make_dinov2_model`: plain models offset 0.1 and no antialias,
# `_reg` models 4 registers, offset 0 and antialias).
BACKBONES: dict[str, BackboneSpec] = {
    "vit_small": BackboneSpec("DINO", "vit_small_patch{p}_224", (16, 8), {
        16: f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        8: f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"}),
    "vit_base": BackboneSpec("DINO", "vit_base_patch{p}_224", (16, 8), {
        16: f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        8: f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"}),
    "dinov2_vits14": BackboneSpec("DINOv2", "vit_small_patch14_dinov2", (14,), {
        14: f"{_DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth"}, mask_token=True, features="centred"),
    "dinov2_vitb14": BackboneSpec("DINOv2", "vit_base_patch14_dinov2", (14,), {
        14: f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth"}, mask_token=True, features="centred"),
    "dinov2_vits14_reg": BackboneSpec("DINOv2", "vit_small_patch14_dinov2", (14,), {
        14: f"{_DINOV2}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"}, register_tokens=4,
        interpolate_offset=0.0, interpolate_antialias=True, mask_token=True, features="centred"),
    "dinov2_vitb14_reg": BackboneSpec("DINOv2", "vit_base_patch14_dinov2", (14,), {
        14: f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"}, register_tokens=4,
        interpolate_offset=0.0, interpolate_antialias=True, mask_token=True, features="centred"),
}
ARCHS = tuple(BACKBONES)
PATCH_SIZES = tuple(sorted({p for spec in BACKBONES.values() for p in spec.patch_sizes}))


def backbone_spec(arch: str) -> BackboneSpec:
    if arch not in BACKBONES:
        raise UserError(f"unknown --arch {arch!r}; choose one of {list(BACKBONES)}")
    return BACKBONES[arch]


def resolve_patch_size(arch: str, patch_size: int | None) -> int:
    """The patch size of `--arch`: `None` takes its default (16 for DINO, 14 for DINOv2); any other
    value must be one the arch was released with."""
    spec = backbone_spec(arch)
    if patch_size is None:
        return spec.patch_sizes[0]
    if patch_size not in spec.patch_sizes:
        allowed = " or ".join(map(str, spec.patch_sizes))
        raise UserError(f"--arch {arch} has patch size {allowed}, not --patch_size {patch_size}; "
                        f"pass --patch_size {spec.patch_sizes[0]} or leave it out")
    return patch_size


def archs_by_family() -> str:
    """The archs for --help, grouped by family: `vit_small, vit_base (DINO), dinov2_vits14, ... (DINOv2)`."""
    families = {}
    for arch, spec in BACKBONES.items():
        families.setdefault(spec.family, []).append(arch)
    return ", ".join(f"{', '.join(archs)} ({family})" for family, archs in families.items())
