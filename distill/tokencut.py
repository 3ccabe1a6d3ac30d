"""TokenCut (Wang et al., CVPR 2022, "Self-Supervised Transformers for Unsupervised Object Discovery
using Normalized Cut").

One object per image from the last block's patch keys (all heads concatenated, CLS dropped), as
`object_discovery.py: ncut` of YangtaoWANG95/TokenCut does it:

* Graph (Sec. 3.2, Eq. 2): E_ij = 1 if cos(k_i, k_j) > τ (default 0.2), else ε = 1e-5.
* Normalized cut (Eq. 3-4): the second-smallest eigenvector y₁ of (D − E) y = λ D y
  (`distill.ncut`, batched in torch instead of scipy's per-image `eigh`).
* Bipartition (Eq. 5): the patches with y₁ above its mean.
* Foreground (Sec. 3.2): the seed is the patch of largest |y₁|; the partition holding it is the
  foreground (the official code flips the partition when the seed falls outside it), and the object
  is the 4-connected component of the foreground that holds the seed. With `attention` (the CLS
  token's scores of the patches; `--foreground attention`, the DINOv2 default) the foreground is
  the partition the CLS token attends to more instead (`distill.ncut.attended_side`).

Score: 1 − Ncut(mask)/2 on the same graph E, in [0, 1]; see `distill.ncut.cut_score`.
"""
from __future__ import annotations

import numpy as np
import torch

from distill.ncut import EPS, attended_side, binary_affinity, cut_score, second_smallest_eigenvectors
from distill.maskgen import cls_attention
from distill.patches import PatchFeatures, PatchMask, seed_component
from distill.registry import Method

TAU = 0.2


def tokencut(keys: torch.Tensor, grid: tuple[int, int], tau: float = TAU, eps: float = EPS,
             attention: torch.Tensor | None = None) -> list[PatchMask]:
    """One TokenCut mask per image. keys: (B, N, D) patch features; grid: (grid_h, grid_w);
    attention: None for the official foreground rule, or (B, N) CLS scores of the patches."""
    batch = keys.shape[0]
    grid_h, grid_w = grid
    affinity = binary_affinity(keys, tau, eps)
    _, vectors = second_smallest_eigenvectors(affinity)
    above = vectors > vectors.mean(-1, keepdim=True)
    if attention is None:
        seeds = vectors.abs().argmax(-1)
        seed_above = above.gather(-1, seeds[:, None])
        partition = torch.where(seed_above, above, ~above).reshape(batch, grid_h, grid_w).cpu().numpy()
        seeds = seeds.tolist()
    else:
        sides = [attended_side(v, a, grid) for v, a in zip(vectors.cpu().numpy(), attention.float().cpu().numpy())]
        partition = np.stack([side for side, _ in sides])
        seeds = [row * grid_w + col for _, (row, col) in sides]
    masks = [seed_component(partition[b], divmod(seed, grid_w)) for b, seed in enumerate(seeds)]
    for b, seed in enumerate(seeds):
        if not masks[b].any():  # a constant vector (a one-patch grid) cuts nothing: keep the seed patch
            masks[b][divmod(seed, grid_w)] = True
    mask_tensor = torch.stack([torch.from_numpy(m.reshape(-1)) for m in masks]).to(affinity.device)
    scores = cut_score(affinity, mask_tensor).tolist()
    return [PatchMask(mask=mask, score=score, seed_patch=divmod(seed, grid_w))
            for mask, score, seed in zip(masks, scores, seeds)]


def propose_tokencut(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in tokencut(features.patch_keys, features.grid, tau=params["tau"],
                                  attention=cls_attention(features, params["foreground"]))]


# DINOv2: the official foreground rules pick the background side of some cuts; the CLS attention does not.
TOKENCUT = Method("tokencut", propose_tokencut, {"tau": TAU, "foreground": "eigenvector"},
                  score="1 - Ncut/2 of the mask on its graph", family_defaults={"DINOv2": {"foreground": "attention"}})
