"""LOST (Siméoni et al., BMVC 2021, "Localizing Objects with Self-Supervised Transformers and no Labels").

One object per image from the last block's patch keys k_i (all heads concatenated, CLS dropped),
as `object_discovery.py: lost` of valeoai/LOST does it:

* Patch similarity graph A = K Kᵀ (raw dot products, Sec. 3.1, Eq. 1: a_ij = k_i · k_j).
* Degree d_i = #{j ≠ i : a_ij > 0} (Eq. 2, the diagonal zeroed); patches are sorted by increasing
  degree with the same `torch.argsort(-d, descending=True)` call as the official code, so ties
  are broken identically.
* Seed s* = the patch of lowest degree (Eq. 3).
* Seed expansion (Eq. 4): of the `k_patches` (default 100) lowest-degree patches, S = those with
  a_s*j > 0 (the seed itself included).
* Box/mask extraction (Eq. 5): m_j = 1 if Σ_{s ∈ S} a_sj > 0; the object is the 4-connected
  component of m that holds the seed (`scipy.ndimage.label`).

Where the official code raises ("The seed is in the background component", never observed by its
authors), the mask here is the seed patch alone, so that every image keeps a proposal.

Score: 1 − Ncut(mask)/2 on LOST's own graph (the patches joined where a_ij > 0, no self-loops),
in [0, 1]; see `distill.ncut.cut_score`.
"""
from __future__ import annotations

import numpy as np
import torch

from distill.ncut import cut_score
from distill.patches import PatchFeatures, PatchMask, seed_component
from distill.registry import Method

K_PATCHES = 100


def lost(keys: torch.Tensor, grid: tuple[int, int], k_patches: int = K_PATCHES) -> list[PatchMask]:
    """One LOST mask per image. keys: (B, N, D) patch features; grid: (grid_h, grid_w) with N = grid_h * grid_w."""
    batch, num_patches, _ = keys.shape
    grid_h, grid_w = grid
    similarity = torch.bmm(keys, keys.transpose(1, 2))  # float32, as the official code
    positive = similarity > 0
    positive.diagonal(dim1=1, dim2=2).fill_(False)
    degree = positive.sum(-1).cpu()

    seeds, expansions = [], []
    for b in range(batch):
        # The official call, on CPU: an unstable sort whose tie order we reproduce.
        order = torch.argsort(-degree[b].to(torch.float32), descending=True)
        seed = int(order[0])
        candidates = order[:k_patches].to(similarity.device)
        similar = candidates[similarity[b, seed, candidates] > 0]
        seeds.append(seed)
        expansions.append(similarity[b, similar].sum(0) > 0)
    foreground = torch.stack(expansions).reshape(batch, grid_h, grid_w).cpu().numpy()

    masks = []
    for b, seed in enumerate(seeds):
        seed_rc = divmod(seed, grid_w)
        mask = seed_component(foreground[b], seed_rc)
        if not mask.any():
            mask = np.zeros((grid_h, grid_w), dtype=bool)
            mask[seed_rc] = True
        masks.append(mask)
    mask_tensor = torch.from_numpy(np.stack(masks).reshape(batch, num_patches)).to(similarity.device)
    scores = cut_score(positive.to(torch.float64), mask_tensor).tolist()
    return [PatchMask(mask=mask, score=score, seed_patch=divmod(seed, grid_w),
                      seed_in_background=not foreground[b][divmod(seed, grid_w)])
            for b, (mask, score, seed) in enumerate(zip(masks, scores, seeds))]


def propose_lost(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in lost(features.patch_keys, features.grid, k_patches=params["k_patches"])]


# DINOv2: LOST's degrees and seed expansion work on the centred output tokens at the patch grid of
# its official runs (DINO /16 on VOC's ~500x375 images: 23 rows), not at full resolution.
LOST = Method("lost", propose_lost, {"k_patches": K_PATCHES}, score="1 - Ncut/2 of the mask on LOST's graph",
              family_defaults={"DINOv2": {"features": "centred_tokens", "resize": 320}})
