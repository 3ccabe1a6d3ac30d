"""torchvision's RoIHeads with a mask branch for partial supervision and weight-transfer heads.

The box branch is torchvision's own (`super().forward`). The mask branch is re-run here because
two things differ from `torchvision.models.detection.roi_heads.maskrcnn_loss`:
  * the loss of a RoI whose ground-truth class has no mask supervision (set B) is masked out;
  * a `TransferMaskPredictor` needs the box predictor to build its class weights.
Class-agnostic predictors (one output channel) are handled on the same code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes

from detectron2_train.transfer_head import TransferMaskPredictor


def partial_mask_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor,
                      supervised: Tensor) -> Tensor:
    """Mean per-pixel BCE over the RoIs whose class has mask supervision; 0 (with a graph) if none.

    mask_logits (N, K or 1, M, M); labels (N,) contiguous class ids; mask_targets (N, M, M) in [0, 1];
    supervised (num_classes,) bool. With every class supervised this equals torchvision's loss.
    """
    keep = supervised[labels]
    if mask_targets.numel() == 0 or not bool(keep.any()):
        return mask_logits.sum() * 0
    channel = labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), channel]
    return F.binary_cross_entropy_with_logits(logits[keep], mask_targets[keep])


class MaskRoIHeads(RoIHeads):
    """RoIHeads whose mask loss only counts classes in `mask_classes` (all classes by default)."""

    def __init__(self, *args, num_classes: int, mask_classes: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        supervised = torch.ones(num_classes, dtype=torch.bool)  # index 0 = background
        if mask_classes is not None:
            supervised[:] = False
            supervised[list(mask_classes)] = True
        # not persistent: which classes have masks is a property of the training data, not the weights
        self.register_buffer("mask_supervised", supervised, persistent=False)
        self._sampled: tuple | None = None

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, num_classes: int, mask_classes: list[int] | None = None) -> "MaskRoIHeads":
        """Wrap torchvision's heads (same modules, matcher, sampler and box coder)."""
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 512, 0.25, None,
                  heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                  mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
                  num_classes=num_classes, mask_classes=mask_classes)
        new.proposal_matcher, new.fg_bg_sampler, new.box_coder = heads.proposal_matcher, heads.fg_bg_sampler, heads.box_coder
        return new

    def has_mask(self) -> bool:
        # The parent's forward runs the box branch only; `forward` below runs the mask branch.
        return False

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        self._sampled = sampled  # (proposals, matched_idxs, labels, regression_targets), used by the mask branch
        return sampled

    def predict_mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor],
                            image_shapes: list[tuple[int, int]]) -> Tensor:
        mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        if isinstance(self.mask_predictor, TransferMaskPredictor):
            return self.mask_predictor(mask_features, self.box_predictor)
        return self.mask_predictor(mask_features)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None or any("masks" not in t for t in targets):
                raise ValueError("training targets need 'masks'")
        self._sampled = None
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            sampled_proposals, matched_idxs, labels, _ = self._sampled
            self._sampled = None
            mask_boxes, roi_labels, mask_targets = [], [], []
            for props, idxs, lab, target in zip(sampled_proposals, matched_idxs, labels, targets):
                pos = torch.where(lab > 0)[0]  # masks are learned on foreground RoIs only
                mask_boxes.append(props[pos])
                roi_labels.append(target["labels"][idxs[pos]])
                mask_targets.append((props[pos], idxs[pos], target["masks"]))
            mask_logits = self.predict_mask_logits(features, mask_boxes, image_shapes)
            size = mask_logits.shape[-1]
            targets_mm = torch.cat([project_masks_on_boxes(m, b, i, size) for b, i, m in mask_targets], dim=0)
            losses["loss_mask"] = partial_mask_loss(mask_logits, torch.cat(roi_labels), targets_mm,
                                                    self.mask_supervised)
        else:
            mask_logits = self.predict_mask_logits(features, [r["boxes"] for r in result], image_shapes)
            labels = torch.cat([r["labels"] for r in result])
            channel = labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)
            probs = mask_logits[torch.arange(labels.shape[0], device=labels.device), channel].sigmoid()[:, None]
            for r, p in zip(result, probs.split([len(r["labels"]) for r in result])):
                r["masks"] = p  # (n, 1, M, M); pasted into the image by the model's transform
        return result, losses
