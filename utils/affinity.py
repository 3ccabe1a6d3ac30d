"""Pairwise affinity (PA) of instance masks, the quantity GGN's predictor learns (Wang et al., CVPR 2022).

The PA of a pixel is the fraction of its 8 neighbours at distance 1 that belong to the same
instance. Background counts as one instance, so a background pixel among background pixels has
PA 1, as in GGN's target; object interiors are 1 too and boundaries between two labels dip
below 1. One map serves two purposes: the training target of the PA predictor
(`detectron2_train/affinity.py`) and the oracle affinity of the grouping (`distill/grouping.py`).

Pairs of two background pixels say nothing about objects, so the loss leaves out pixels whose
8 pairs are all background-background (`loss_mask`), as GGN's `filter_bg` does. Differences
from GGN's target, on purpose: neighbours outside the image are left out of the mean (GGN counts
them as "different", which darkens every image border), and overlapping masks are painted
largest first so that a small object on a large one stays whole (GGN adds the instance indices).
"""
from __future__ import annotations

import numpy as np

# The 8 neighbours at distance 1, as (row, column) offsets.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def instance_label_map(masks: np.ndarray | list[np.ndarray], height: int | None = None,
                       width: int | None = None) -> np.ndarray:
    """Binary instance masks (N x H x W) -> int32 label map: 0 background, i + 1 for masks[i].

    Masks are painted from the largest to the smallest, so where masks overlap the smaller wins."""
    if len(masks) == 0:
        if height is None or width is None:
            raise ValueError("an empty mask list needs height and width")
        return np.zeros((height, width), dtype=np.int32)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    labels = np.zeros(masks[0].shape, dtype=np.int32)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        labels[masks[i]] = i + 1
    return labels


def pairwise_affinity(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pa, loss_mask) of an instance label map (0 = background), both float32 H x W.

    `pa`: fraction of the pixel's in-image 8-neighbours with the same label.
    `loss_mask`: 1 where at least one of the pixel's pairs involves an object pixel (the pixel
    itself or a neighbour is not background), 0 where every pair is background-background."""
    labels = np.asarray(labels)
    height, width = labels.shape
    padded = np.full((height + 2, width + 2), -1, dtype=np.int64)  # -1: outside the image
    padded[1:-1, 1:-1] = labels
    same = np.zeros((height, width), dtype=np.float32)
    inside = np.zeros((height, width), dtype=np.float32)
    touches_object = labels > 0
    for dy, dx in NEIGHBOUR_OFFSETS:
        neighbour = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        same += neighbour == labels
        inside += neighbour >= 0
        touches_object |= neighbour > 0
    pa = np.divide(same, inside, out=np.ones_like(same), where=inside > 0)  # a 1x1 image has no pairs
    return pa, touches_object.astype(np.float32)
