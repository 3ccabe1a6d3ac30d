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

import math

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


# ----------------------------------------------------------------------------- held-out scores


class AffinityScores:
    """How well PA maps predict their targets, pooled over the loss-mask pixels of many images, next
    to the best constant predictor (the figure a learned map must beat to know anything).

        scores = AffinityScores()
        for pred, target, loss_mask in images:   # (H, W) arrays; pred: predicted PA in [0, 1]
            scores.add(pred, target, loss_mask)
        scores.result()  # {"bce", "weighted_bce", "boundary_f", "boundary_threshold", "constant_*", ...}

    - `bce`: binary cross-entropy against the soft target; `weighted_bce`: with the positive term
      weighted by `pos_weight` (GGN's loss, pooled over pixels rather than averaged per image).
    - `boundary_f`: the best F-score over thresholds t (in steps of 1 / `bins`) of "PA < t" as a
      detector of boundary pixels, those whose target is below 1 (some neighbour in another
      instance); `boundary_threshold` is that t.
    - `constant_*`: the same figures for the best constant map, in closed form: c = mean target for
      the BCE, c = w y / (w y + 1 - y) for the weighted one, and the all-boundary map for the F-score
      (F = 2p / (1 + p), p the fraction of boundary pixels).
    """

    EPS = 1e-6  # probabilities are clipped to [EPS, 1 - EPS] in the cross-entropies

    def __init__(self, pos_weight: float = 1.0, bins: int = 100):
        self.pos_weight, self.bins = float(pos_weight), int(bins)
        self.pixels = 0
        self.target_sum = 0.0
        self.bce_sum = 0.0
        self.weighted_bce_sum = 0.0
        self.boundary_hist = np.zeros(self.bins, dtype=np.int64)  # predicted PA of boundary pixels
        self.interior_hist = np.zeros(self.bins, dtype=np.int64)  # ... and of the other pixels
        self.images = 0

    def add(self, pred: np.ndarray, target: np.ndarray, loss_mask: np.ndarray) -> None:
        keep = np.asarray(loss_mask) > 0
        p = np.clip(np.asarray(pred, dtype=np.float64)[keep], self.EPS, 1 - self.EPS)
        y = np.asarray(target, dtype=np.float64)[keep]
        positive, negative = -y * np.log(p), -(1 - y) * np.log1p(-p)
        self.images += 1
        self.pixels += int(y.size)
        self.target_sum += float(y.sum())
        self.bce_sum += float((positive + negative).sum())
        self.weighted_bce_sum += float((self.pos_weight * positive + negative).sum())
        bins = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        boundary = y < 1
        self.boundary_hist += np.bincount(bins[boundary], minlength=self.bins)
        self.interior_hist += np.bincount(bins[~boundary], minlength=self.bins)

    def result(self) -> dict:
        if self.pixels == 0:
            raise ValueError("no pixel in any loss mask: nothing to score")
        n, w = self.pixels, self.pos_weight
        mean = self.target_sum / n
        c = min(max(mean, self.EPS), 1 - self.EPS)
        cw = min(max(w * mean / (w * mean + 1 - mean), self.EPS), 1 - self.EPS)
        # "PA < t" for t = k / bins: pixels in bins 0 .. k-1
        true_pos = np.concatenate([[0], np.cumsum(self.boundary_hist)])
        false_pos = np.concatenate([[0], np.cumsum(self.interior_hist)])
        boundary_total = int(true_pos[-1])
        f = 2 * true_pos / np.maximum(true_pos + false_pos + boundary_total, 1)
        best = int(np.argmax(f))
        fraction = boundary_total / n
        # average precision: precision at each threshold times the recall it adds (BSDS's AP)
        precision = true_pos[1:] / np.maximum(true_pos[1:] + false_pos[1:], 1)
        recall_gain = np.diff(true_pos) / max(boundary_total, 1)
        ap = float((precision * recall_gain).sum())
        return {
            "images": self.images, "pixels": n, "boundary_fraction": fraction,
            "bce": self.bce_sum / n, "weighted_bce": self.weighted_bce_sum / n,
            "boundary_f": float(f[best]), "boundary_threshold": best / self.bins, "boundary_ap": ap,
            "constant_bce": -mean * math.log(c) - (1 - mean) * math.log1p(-c),
            "constant_weighted_bce": -w * mean * math.log(cw) - (1 - mean) * math.log1p(-cw),
            "constant_boundary_f": 2 * fraction / (1 + fraction), "constant_boundary_ap": fraction,
        }
