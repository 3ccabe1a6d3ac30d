"""DropLoss (CutLER, Wang et al. 2023) and the Fast R-CNN box losses it weights.

Pseudo-masks miss objects. Trained on them as they are, a detector learns that every missed
object is background. DropLoss removes the classification loss of each sampled RoI whose
predicted box overlaps no pseudo box: max IoU <= `iou_thresh` (0.01 in CutLER) over the image's
boxes. As in CutLER, the predicted box is the RoI regressed by the box predictor (for
class-specific regression, with the deltas of its highest-scoring foreground class), the loss is
still averaged over all sampled RoIs, and the box-regression loss (positives only, which overlap
a pseudo box by construction) is untouched. An image without any pseudo box is an explicit
negative: its RoIs keep their loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou


def predicted_boxes(class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                    box_coder: BoxCoder) -> list[Tensor]:
    """One regressed box per RoI, per image (no gradient).

    `box_regression` is (N, 4) (class-agnostic) or (N, 4 * K) (class-specific, background first);
    a class-specific RoI takes the deltas of its highest-scoring foreground class.
    """
    with torch.no_grad():
        decoded = box_coder.decode(box_regression.detach(), proposals)  # (N, 1 or K, 4)
        if decoded.shape[1] > 1:
            best = class_logits.detach()[:, 1:].argmax(dim=1) + 1
            decoded = decoded[torch.arange(decoded.shape[0], device=decoded.device), best]
        else:
            decoded = decoded[:, 0]
    return list(decoded.split([len(p) for p in proposals]))


def droploss_weights(boxes: list[Tensor], gt_boxes: list[Tensor], iou_thresh: float) -> Tensor:
    """Per-RoI loss weights, concatenated over images: 0 where the box's max IoU with every GT box
    of its image is <= iou_thresh, else 1. Images without GT boxes keep all their RoIs (weight 1)."""
    weights = []
    for roi_boxes, gt in zip(boxes, gt_boxes):
        if gt.numel() == 0 or roi_boxes.numel() == 0:
            weights.append(roi_boxes.new_ones(roi_boxes.shape[0]))
            continue
        max_iou = box_iou(roi_boxes, gt).max(dim=1).values
        weights.append((max_iou > iou_thresh).to(roi_boxes.dtype))
    return torch.cat(weights)


def fast_rcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                   regression_targets: list[Tensor], weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """torchvision's `fastrcnn_loss`, with optional per-RoI weights on the classification term
    (DropLoss) and class-agnostic box regression ((N, 4)) accepted.

    Classification: cross-entropy averaged over all sampled RoIs (weighted terms, same divisor).
    Box: smooth L1 (beta 1/9) on the positives' deltas for their class, summed, divided by the
    number of RoIs. Without weights and with class-specific regression this equals torchvision's.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    if weights is None:
        loss_cls = F.cross_entropy(class_logits, labels_all)
    else:
        per_roi = F.cross_entropy(class_logits, labels_all, reduction="none")
        loss_cls = (weights * per_roi).sum() / max(labels_all.numel(), 1)
    pos = torch.where(labels_all > 0)[0]
    box_regression = box_regression.reshape(box_regression.shape[0], -1, 4)
    column = labels_all[pos] if box_regression.shape[1] > 1 else torch.zeros_like(pos)
    loss_box = F.smooth_l1_loss(box_regression[pos, column], targets_all[pos], beta=1 / 9, reduction="sum")
    return loss_cls, loss_box / max(labels_all.numel(), 1)
