"""MaskDistill's object-mask proposal from the last-layer queries and keys of a DINO ViT.

Notation follows Van Gansbeke et al. 2022, Sec. 3.1 ("Discovering Object Masks with
Transformers"), which extends LOST (Siméoni et al. 2021) with a class-token seed:

* G_cls = q_cls · K_patchᵀ per head, averaged over the first `heads` heads: the raw product,
  with neither the 1/sqrt(d) scale nor the softmax of the attention map.
* DINO's mass threshold keeps the patches carrying the top 50% of G_cls's mass.
* G_i = K Kᵀ over patches, summed over all heads (the patch-similarity graph of LOST).
* The top `topk` fraction of patches by G_cls are candidates; the first is the seed.
* The sources are the candidates whose similarity to the seed is positive. A patch belongs
  to the object when the sum of the sources' rows of G_i is positive; the mask is the
  connected component of such patches that contains the seed.

G_i is never materialised: by linearity, the sum of rows Σ_s G_i[s] = (Σ_s k_s) · Kᵀ, and the
seed's row is k_seed · Kᵀ. This turns an O(N²) matrix per image into two O(N·D) products.
"""
from __future__ import annotations

import numpy as np
import torch

from distill.patches import PatchFeatures, PatchMask, seed_component
from distill.registry import Method


def mass_threshold(values: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """DINO's attention threshold, along the last dimension.

    Sort ascending, divide by the sum, take the cumulative sum, and zero every entry whose
    cumulative value is ≤ 1 - mass; the survivors carry the top `mass` of the total.
    """
    sorted_vals, order = torch.sort(values, dim=-1)
    cumulative = torch.cumsum(sorted_vals / sorted_vals.sum(dim=-1, keepdim=True), dim=-1)
    keep_sorted = cumulative > (1.0 - mass)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return torch.where(keep, values, torch.zeros_like(values))


def class_token_scores(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    """G_cls: (B, N) raw products of the CLS query with the patch keys, mean over the first `heads`."""
    q_cls = query[:, :heads, 0, :]  # (B, h, d)
    k_patches = key[:, :heads, 1:, :]  # (B, h, N, d)
    return torch.einsum("bhd,bhnd->bhn", q_cls.float(), k_patches.float()).mean(dim=1)


def propose_masks(query: torch.Tensor, key: torch.Tensor, grid_h: int, grid_w: int,
                  heads: int = 5, topk: float = 0.4, mass: float = 0.5,
                  graph_key: torch.Tensor | None = None) -> list[PatchMask]:
    """One object mask per image from the last block's queries and keys.

    Args:
        query, key: (B, num_heads, 1 + N, head_dim), CLS token first, N = grid_h * grid_w.
        heads: number of heads averaged for G_cls (the first ones).
        topk: fraction of the N patches kept as candidates.
        mass: DINO threshold mass applied to G_cls.
        graph_key: keys for the patch graph G_i, same shape (default: `key`); see
            `distill.features.DiscoveryFeatures` (DINOv2 centres them).
    """
    batch, num_heads, tokens, head_dim = key.shape
    num_patches = grid_h * grid_w
    if tokens != num_patches + 1:
        raise ValueError(f"{tokens} tokens do not match a {grid_h}x{grid_w} grid plus CLS")
    heads = max(1, min(heads, num_heads))

    cls_scores = mass_threshold(class_token_scores(query, key, heads), mass)  # (B, N)
    # Keys of all heads concatenated: K Kᵀ of this matrix is G_i summed over heads.
    graph_key = key if graph_key is None else graph_key
    patch_keys = graph_key[:, :, 1:, :].float().permute(0, 2, 1, 3).reshape(batch, num_patches, num_heads * head_dim)

    num_candidates = max(1, int(topk * num_patches))
    # A stable sort makes ties (many zeros after the threshold) resolve by patch index.
    candidates = torch.sort(cls_scores, dim=1, descending=True, stable=True).indices[:, :num_candidates]
    seeds = candidates[:, 0]
    seed_keys = patch_keys[torch.arange(batch), seeds]  # (B, D)
    candidate_keys = torch.gather(patch_keys, 1, candidates[..., None].expand(-1, -1, patch_keys.shape[-1]))
    is_source = torch.einsum("bd,bkd->bk", seed_keys, candidate_keys) > 0  # G_i[seed, candidate] > 0
    source_key_sum = (candidate_keys * is_source[..., None]).sum(dim=1)  # Σ_s k_s
    object_scores = torch.einsum("bd,bnd->bn", source_key_sum, patch_keys)  # Σ_s G_i[s, :]
    foreground = (object_scores > 0).reshape(batch, grid_h, grid_w).cpu().numpy()

    cls_mass = cls_scores.clamp(min=0).cpu().numpy().reshape(batch, grid_h, grid_w)
    results = []
    for b, seed in enumerate(seeds.tolist()):
        seed_rc = divmod(seed, grid_w)
        mask = seed_component(foreground[b], seed_rc)
        in_background = not mask.any()
        if in_background:
            # The seed's own score is not positive; keep the seed patch so every image has a mask.
            mask[seed_rc] = True
        total = cls_mass[b].sum(dtype=np.float64)
        score = min(1.0, float(cls_mass[b][mask].sum(dtype=np.float64) / total)) if total > 0 else 0.0
        results.append(PatchMask(mask=mask, score=score, seed_patch=seed_rc, seed_in_background=in_background))
    return results


def cls_attention(features: PatchFeatures, foreground: str) -> torch.Tensor | None:
    """The CLS scores of the patches (G_cls over all heads) for `--foreground attention`, else None."""
    if foreground == "eigenvector":
        return None
    return class_token_scores(features.query, features.key, features.key.shape[1])


def propose_maskdistill(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in propose_masks(features.query, features.key, *features.grid, heads=params["heads"],
                                       topk=params["topk"], graph_key=features.graph_key)]


MASKDISTILL = Method("maskdistill", propose_maskdistill, {"heads": 5, "topk": 0.4}, resize=640,
                     score="share of the thresholded CLS-attention mass inside the mask")
