"""MaskCut (Wang et al., CVPR 2023, "Cut and Learn for Unsupervised Object Detection and Instance
Segmentation", Sec. 3.1), as `maskcut/maskcut.py` of facebookresearch/CutLER runs it with its README
recipe (`--N 3 --tau 0.15 --fixed_size 480`).

Patch level (`maskcut`), for each image, from the last block's patch keys (all heads concatenated):

* Cut t = 1..N: TokenCut's graph W_ij = 1 if cos(k_i, k_j) > τ else ε (Eq. 1), the second-smallest
  eigenvector x of (D − W) x = λ D x (Eq. 2; `distill.ncut`), split at its mean.
* Foreground (the two criteria of Sec. 3.1), exactly as the official code decides it: the side
  x > mean is reversed when it holds three or more of the grid's four corners (the object-centric
  prior) or does not hold the patch of largest |x|; the seed is then the patch of largest −x, else
  of largest x. The object is the seed's 4-connected component.
  The side x > mean depends on the sign of x, which LAPACK chooses (scipy's `eigh`): when the
  side holding the largest |x| holds three or more corners, the corner rule applies for one sign
  and not for the other. `distill.ncut` returns the sign LAPACK returns, so the decision is the
  official one (for 30 real images, LAPACK's sign was the one that skips the rule in 6 of 7 such cases).
  With `attention` (`--foreground attention`, the DINOv2 default) the object is instead the side
  the CLS token attends to more, over the patches not yet taken (`distill.ncut.attended_side`).
* Before cut t + 1 the features of every object found so far are zeroed (Eq. 3: "masking out"),
  which leaves their patches linked to all others by ε only.
* Cut t >= 2 is dropped (an empty mask) when its mask has IoU > 0.5 with the mask of cut t − 1, or
  covers <= 1% of the grid. As in the official code the comparison is with the previous cut's mask
  as kept (empty if it was dropped), and a dropped mask adds nothing to the zeroed features.

Pixel level (`refine_masks`), on the square `fixed_size` image the network saw (before its rounding
to the patch multiple):

* Each mask is upsampled (torch's nearest rule), minus the pixels of earlier masks of the image.
* Dense CRF (CutLER's `crf.py`): unary from the softmax of {1 − m, m} as logits, 10 mean-field
  iterations, Gaussian (sxy 3, compat 7) and bilateral (sxy 50, srgb 5, compat 10) kernels. The
  CRF's pairwise terms are built once per image and reused for its masks (`utils.crf.PairwiseCRF`).
* Holes filled; the mask dropped if its IoU with the upsampled cut is < 0.5.
* Resized to the original image size as CutLER does: PIL's default (bicubic) resize of the 0/255
  mask, kept where it exceeds half its maximum.

Score (MaskCut defines none; `--mask_score`): `official`, this code's reproduction score, is
1 − Ncut(mask)/2 of the patch mask on the image's unmasked graph W, in [0, 1] (`distill.ncut.cut_score`);
`attention` (`attention_scores`, the DINOv2 default) is the mean CLS attention of the mask's
patches, scaled to [0, 1] per image. It ranks the masks within and across images; the masks of an
image are written best-first by it (the cuts and the CRF run in discovery order either way).

Not reproduced from the official script: its COCO JSON swaps image width and height, and its bare
`except` silently drops images that fail; here unreadable images are reported under `skipped_images`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from distill.data import Geometry, working_to_patch
from distill.ncut import EPS, attended_side, binary_affinity, cut_score, second_smallest_eigenvectors
from distill.maskgen import class_token_scores, cls_attention
from distill.patches import PatchFeatures, PatchMask, seed_component
from distill.registry import Method
from utils.crf import CRFParams, PairwiseCRF

NUM_OBJECTS = 3
TAU = 0.15
FIXED_SIZE = 480
CRF = CRFParams(iterations=10, gauss_sxy=3.0, gauss_compat=7.0, bilateral_sxy=50.0, bilateral_srgb=5.0,
                bilateral_compat=10.0)
MAX_IOU_WITH_PREVIOUS = 0.5
MIN_AREA_FRACTION = 0.01
MIN_CRF_IOU = 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; NaN for two empty masks (then neither `> t` nor `< t` holds, as in CutLER)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def _choose_foreground(vector: np.ndarray, grid: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(foreground side of the cut, seed) for one eigenvector, as signed by the solver (LAPACK's sign)."""
    above = (vector > vector.mean()).reshape(grid)
    corners = int(above[0, 0]) + int(above[0, -1]) + int(above[-1, 0]) + int(above[-1, -1])
    if corners >= 3 or not above.flat[np.abs(vector).argmax()]:
        return ~above, divmod(int((-vector).argmax()), grid[1])
    return above, divmod(int(vector.argmax()), grid[1])


def maskcut(keys: torch.Tensor, grid: tuple[int, int], num_objects: int = NUM_OBJECTS, tau: float = TAU,
            eps: float = EPS, solver: Callable = second_smallest_eigenvectors,
            attention: torch.Tensor | None = None) -> list[list[PatchMask]]:
    """Up to `num_objects` masks per image, in discovery order. keys: (B, N, D); grid: (grid_h, grid_w).

    `solver(graphs) -> (values, vectors)` is the Ncut eigensolver (benchmarks swap in scipy's);
    `attention`: None for the official foreground rule, or (B, N) CLS scores of the patches."""
    batch, num_patches, _ = keys.shape
    full_graph = binary_affinity(keys, tau, eps)
    removed = torch.zeros(batch, num_patches, dtype=torch.bool, device=keys.device)
    previous = np.zeros((batch, *grid), dtype=bool)
    found: list[list[tuple[np.ndarray, tuple[int, int]]]] = [[] for _ in range(batch)]
    cls_scores = None if attention is None else attention.float().cpu().numpy()
    for step in range(num_objects):
        if step == 0:
            graph = full_graph
        else:
            removed |= torch.from_numpy(previous.reshape(batch, num_patches)).to(keys.device)
            graph = binary_affinity(keys * ~removed[..., None], tau, eps)
        _, vectors = solver(graph)
        vectors = vectors.cpu().numpy()
        active = (~removed).cpu().numpy()
        for b in range(batch):
            if attention is None:
                side, seed = _choose_foreground(vectors[b], grid)
            else:
                side, seed = attended_side(vectors[b], cls_scores[b], grid, active[b])
            mask = seed_component(side, seed)
            if step and (_iou(previous[b], mask) > MAX_IOU_WITH_PREVIOUS or mask.mean() <= MIN_AREA_FRACTION):
                mask = np.zeros_like(mask)
            previous[b] = mask
            if mask.any():
                found[b].append((mask, seed))
    flat = [(b, mask, seed) for b in range(batch) for mask, seed in found[b]]
    if not flat:
        return [[] for _ in range(batch)]
    masks = torch.from_numpy(np.stack([mask.reshape(-1) for _, mask, _ in flat])).to(keys.device)
    scores = cut_score(full_graph[[b for b, _, _ in flat]], masks).tolist()
    results: list[list[PatchMask]] = [[] for _ in range(batch)]
    for (b, mask, seed), score in zip(flat, scores):
        results[b].append(PatchMask(mask=mask, score=score, seed_patch=seed))
    return results


def attention_scores(masks: list[list[PatchMask]], attention: torch.Tensor) -> list[list[PatchMask]]:
    """The masks rescored by CLS attention (`--mask_score attention`): a mask's score is the mean, over its
    patches, of the image's CLS scores (B, N) scaled to [0, 1] by their range over the image. The object
    draws the CLS token's attention (Caron et al. 2021); a band of sky or ground that a cut separates cleanly
    (a high `official` score) does not. Measured against other attention scores in docs/dinov2.md."""
    scores = attention.float().cpu().numpy()
    rescored: list[list[PatchMask]] = []
    for image_masks, values in zip(masks, scores):
        scaled = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
        rescored.append([dataclasses.replace(m, score=float(scaled[m.mask.reshape(-1)].mean()))
                         for m in image_masks])
    return rescored


def _softmax_unary(mask: np.ndarray) -> np.ndarray:
    """CutLER's unary: softmax over the logits {bg: 1 − m, fg: m}, in float64, then −log, in float32."""
    inside = 1.0 / (1.0 + np.exp(-1.0))  # softmax of the larger of two logits that differ by 1
    probs = np.where(mask[None], np.array([1 - inside, inside])[:, None, None],
                     np.array([inside, 1 - inside])[:, None, None])
    return (-np.log(np.clip(probs, 1e-5, 1.0))).reshape(2, -1).astype(np.float32)


def refine_masks(working: np.ndarray, proposals: list[PatchMask], geometry: Geometry,
                 params: CRFParams = CRF) -> list[np.ndarray | None]:
    """MaskCut's pixel-level steps (see the module docstring): one original-size mask per proposal,
    or None where the proposal is dropped.

    working: the HxWx3 uint8 image the cut was made on (`geometry.working`)."""
    if not proposals:
        return []
    rows, cols = working_to_patch(geometry)
    crf = PairwiseCRF(working, 2, params)  # the pairwise terms of the image, built once for its masks
    height, width = geometry.original
    taken = np.zeros(geometry.working, dtype=bool)
    refined_masks: list[np.ndarray | None] = []
    for proposal in proposals:
        cut = proposal.mask[rows[:, None], cols[None, :]] & ~taken
        taken |= cut
        if not cut.any():  # all its pixels went to earlier masks: the CRF would return nothing either
            refined_masks.append(None)
            continue
        labels = crf.infer(_softmax_unary(cut)).argmax(axis=0)
        refined = ndimage.binary_fill_holes(labels == 1)
        if _iou(cut, refined) < MIN_CRF_IOU:
            refined_masks.append(None)
            continue
        resized = np.asarray(Image.fromarray(refined.astype(np.uint8) * 255).resize((width, height)))
        peak = int(resized.max())
        refined_masks.append(resized > peak / 2 if peak else None)
    return refined_masks


def propose_maskcut(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    masks = maskcut(features.patch_keys, features.grid, num_objects=params["num_objects"], tau=params["tau"],
                    attention=cls_attention(features, params["foreground"]))
    if params["mask_score"] == "attention":
        masks = attention_scores(masks, class_token_scores(features.query, features.key, features.key.shape[1]))
    return masks


# DINOv2: the official foreground rules pick the background side of some cuts; the CLS attention does not; and
# the CLS-attention score ranks the object first more often than 1 - Ncut/2 (docs/dinov2.md).
MASKCUT = Method("maskcut", propose_maskcut, {"num_objects": NUM_OBJECTS, "tau": TAU, "foreground": "eigenvector",
                                              "mask_score": "official"},
                 fixed_size=FIXED_SIZE, refine=refine_masks,
                 score="official: 1 - Ncut/2 of the patch mask on the image's unmasked graph; attention: "
                       "mean CLS attention over the mask's patches, scaled to [0, 1] per image",
                 family_defaults={"DINOv2": {"foreground": "attention", "mask_score": "attention"}})
