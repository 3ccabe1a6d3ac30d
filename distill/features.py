"""The backbone features a discovery method reads, per backbone: one function for every method.

Every discovery method (MaskDistill, LOST, TokenCut, MaskCut) starts from the last block's
queries and keys (`DinoViT.last_qk`: (B, heads, 1 + N, head_dim), CLS first, registers dropped)
and passes them through `discovery_features(qk, setting)`, which returns `DiscoveryFeatures`:

* `query`, `key`: the raw queries and keys, for CLS attention (`q_cls·k_j`, MaskDistill's G_cls).
  They stay raw in every setting: DINO's mass threshold on G_cls needs its positive scale, and
  centred keys would make the scores of an image sum to exactly zero.
* `graph_key`: the keys for patch-to-patch similarity graphs (MaskDistill's and LOST's
  `k_i·k_j`, TokenCut's and MaskCut's cosine graph), per setting:
  * `raw`: the keys themselves. DINO ViTs (`vit_small`, `vit_base`) use it: the methods were
    designed on these features.
  * `centred`: every key minus the mean key over the image's N patches (per image and head; the
    CLS key moves with them), in float32. DINOv2's keys share a large common component
    (measured on a real ViT-S/14 over the 53 shared images at 640 px: the mean patch key has
    92-96% of an average key's norm, and 100% of the patch-key products are positive), so graphs
    built from raw key products join every patch to every other and MaskDistill's mask is the
    whole image. Centring removes the shared part and keeps the differences between patches.
  * `centred_tokens`: the final normalised output tokens (DINOv2's `x_norm_patchtokens`, split
    into the heads' slices so that concatenating the heads gives the token back) minus their mean
    over the image's N patches, in float32. LOST's DINOv2 default (with a 320 shorter side; on the
    real ViT-S/14 it beats centred keys there: tiny_coco CorLoc 25.0% vs 20.8%, voc_mini 2 of 3 vs
    0); not the others' (MaskDistill at 640: voc_mini 1 of 3 vs 2 of 3). It makes LOST's bf16
    masks agree better with fp32 (0.944 vs 0.885). It costs the rest of the last block (attention
    and MLP) in the backbone.
  docs/dinov2.md has the measurements.

`feature_setting(arch)` (`auto`) is the backbone's own setting (`BackboneSpec.features`: `centred` for
every DINOv2 arch, `raw` for DINO); a method may replace it on a backbone family
(`distill.methods.method_defaults`, which `--features auto` resolves through).
`needs_tokens(setting)` says whether the backbone must return its output tokens
(`DinoViT.last_qk(images, tokens=True)`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from distill.registry import FEATURE_SETTINGS
from utils.vit import LastBlockQK
from utils.vit_archs import backbone_spec
from utils.errors import UserError


class DiscoveryFeatures(NamedTuple):
    """What the discovery methods read; every tensor is (B, heads, 1 + N, head_dim), CLS first."""

    query: torch.Tensor  # raw queries
    key: torch.Tensor  # raw keys: CLS attention q_cls·k
    graph_key: torch.Tensor  # keys for patch-patch similarity graphs (per setting)


def feature_setting(arch: str, requested: str = "auto") -> str:
    """The setting `--features requested` means for `--arch arch`: `auto` is the backbone's own."""
    if requested == "auto":
        return backbone_spec(arch).features
    if requested not in FEATURE_SETTINGS:
        raise UserError(f"unknown --features {requested!r}; choose auto or one of {list(FEATURE_SETTINGS)}")
    return requested


def needs_tokens(setting: str) -> bool:
    """Whether `setting` reads the backbone's output tokens (`LastBlockQK.tokens`)."""
    return setting == "centred_tokens"


def centre_keys(key: torch.Tensor) -> torch.Tensor:
    """(B, heads, 1 + N, d) features minus their mean over the N patches (token 0 is CLS), in float32."""
    key = key.float()
    return key - key[:, :, 1:].mean(dim=2, keepdim=True)


def discovery_features(qk: LastBlockQK, setting: str) -> DiscoveryFeatures:
    """The last block's queries and keys as the discovery methods should see them."""
    if setting == "raw":
        return DiscoveryFeatures(qk.query, qk.key, qk.key)
    if setting == "centred":
        return DiscoveryFeatures(qk.query, qk.key, centre_keys(qk.key))
    if setting == "centred_tokens":
        if qk.tokens is None:
            raise ValueError("the centred_tokens setting needs the output tokens: call last_qk(images, tokens=True)")
        return DiscoveryFeatures(qk.query, qk.key, centre_keys(qk.tokens))
    raise ValueError(f"unknown feature setting {setting!r}; expected one of {FEATURE_SETTINGS}")
