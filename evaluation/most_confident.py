"""The most confident prediction per image: the pick of CorLoc (`corloc.most_confident_boxes`) and of the
single-object protocol of COCO AP (`coco_eval.select_most_confident`), written once.

Tie rule: of predictions with equal top scores, the FIRST in the file's order wins (as LOST's and
MaskDistill's evaluations, which take the first maximum). Scores are compared as given, with no tolerance.
"""
from __future__ import annotations

from typing import Hashable, Sequence


def most_confident(predictions: Sequence[dict], keys: Sequence[Hashable] | None = None) -> dict[Hashable, dict]:
    """The most confident of `predictions` per image key (`keys[i]` for `predictions[i]`; default: each
    prediction's `image_id`), in the order the keys first appear. Every prediction has a `score`."""
    if keys is None:
        keys = [prediction["image_id"] for prediction in predictions]
    if len(keys) != len(predictions):
        raise ValueError(f"{len(keys)} keys for {len(predictions)} predictions")
    best: dict[Hashable, dict] = {}
    for key, prediction in zip(keys, predictions):
        # strictly greater: a later prediction of the same score never replaces the first (the tie rule)
        if key not in best or prediction["score"] > best[key]["score"]:
            best[key] = prediction
    return best
