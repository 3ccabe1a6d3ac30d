"""torchvision's RoIHeads with DropLoss on the box branch and a mask branch for partial supervision.

The box branch is torchvision's building blocks (`select_training_samples`, RoI pooling, box head
and predictor, `postprocess_detections`) with `droploss.fast_rcnn_loss`, which equals
torchvision's loss unless DropLoss is on. The mask branch differs from torchvision's
`maskrcnn_loss` in two ways:
  * the loss of a RoI whose ground-truth class has no mask supervision (set B) is masked out;
  * a `TransferMaskPredictor` needs the box predictor to build its class weights.
Class-agnostic predictors (one output channel) are handled on the same code path.
`forward_box` is the part the cascade heads (cascade.py) replace.

`box_score` (model.box_score) chooses how inference scores a detection: "class" is torchvision's (and
detectron2's): one candidate per (proposal, foreground class) scored by that class's probability, NMS per
class. "object" scores each proposal once by its probability of being any object, 1 - p(background), labels it
with its most probable class and runs NMS over all classes: with pseudo-classes (clusters) a detector unsure of
the cluster splits its probability among them, so that "class" ranks a whole object below a confident part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.ops import boxes as box_ops

from detectron2_train.droploss import droploss_weights, fast_rcnn_loss, predicted_boxes
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


BOX_SCORES = ("class", "object")


def object_detections(boxes: Tensor, scores: Tensor, image_shape: tuple[int, int], score_thresh: float,
                      nms_thresh: float, detections_per_img: int) -> dict[str, Tensor]:
    """One image's detections under box_score "object": each proposal once, scored 1 - p(background).

    boxes (N, 4) or (N, K, 4) per class (the most probable foreground class's box is taken); scores (N, K)
    softmax probabilities, background first. Then torchvision's steps: score threshold, small boxes out,
    NMS (over all classes), the best `detections_per_img`."""
    labels = scores[:, 1:].argmax(dim=1) + 1
    if boxes.dim() == 3:
        boxes = boxes[torch.arange(len(boxes), device=boxes.device), labels]
    boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
    object_scores = 1.0 - scores[:, 0]
    keep = torch.where(object_scores > score_thresh)[0]
    boxes, object_scores, labels = boxes[keep], object_scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, object_scores, labels = boxes[keep], object_scores[keep], labels[keep]
    keep = box_ops.nms(boxes, object_scores, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": object_scores[keep]}


class MaskRoIHeads(RoIHeads):
    """RoIHeads whose mask loss only counts classes in `mask_classes` (all classes by default).

    `droploss_iou`: None (off) or the DropLoss IoU threshold. `mask_loss_on` False (stage `box`)
    trains the box branch alone: no mask loss, no mask forward pass in training.
    """

    def __init__(self, *args, num_classes: int, mask_classes: list[int] | None = None,
                 droploss_iou: float | None = None, box_score: str = "class", **kwargs):
        super().__init__(*args, **kwargs)
        if box_score not in BOX_SCORES:
            raise ValueError(f"box_score must be one of {BOX_SCORES}, not {box_score!r}")
        self.box_score = box_score
        supervised = torch.ones(num_classes, dtype=torch.bool)  # index 0 = background
        if mask_classes is not None:
            supervised[:] = False
            supervised[list(mask_classes)] = True
        # not persistent: which classes have masks is a property of the training data, not the weights
        self.register_buffer("mask_supervised", supervised, persistent=False)
        self.droploss_iou = droploss_iou
        self.mask_loss_on = True

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, num_classes: int, mask_classes: list[int] | None = None,
                       droploss_iou: float | None = None, box_score: str = "class", **kwargs) -> "MaskRoIHeads":
        """Wrap torchvision's heads (same modules, matcher, sampler and box coder); `kwargs` go to
        subclasses (the cascade's stage heads)."""
        new = cls(heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 512, 0.25, None,
                  heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                  mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
                  num_classes=num_classes, mask_classes=mask_classes, droploss_iou=droploss_iou,
                  box_score=box_score, **kwargs)
        new.proposal_matcher, new.fg_bg_sampler, new.box_coder = heads.proposal_matcher, heads.fg_bg_sampler, heads.box_coder
        return new

    def class_box_predictor(self) -> nn.Module:
        """The box predictor whose class weights a transfer mask head reads."""
        return self.box_predictor

    def box_losses(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                   labels: list[Tensor], regression_targets: list[Tensor], targets: list[dict],
                   box_coder: BoxCoder) -> tuple[Tensor, Tensor]:
        """Classification and box-regression losses of sampled RoIs, with DropLoss when it is on."""
        weights = None
        if self.droploss_iou is not None:
            boxes = predicted_boxes(class_logits, box_regression, proposals, box_coder)
            weights = droploss_weights(boxes, [t["boxes"] for t in targets], self.droploss_iou)
        return fast_rcnn_loss(class_logits, box_regression, labels, regression_targets, weights)

    def forward_box(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                    targets: list[dict] | None = None) -> tuple[list[dict], dict[str, Tensor], tuple | None]:
        """The box branch: (detections, losses, sampled RoIs for the mask branch).

        Training returns no detections and `(proposals, matched_idxs, labels)` of the sampled RoIs;
        inference returns `{"boxes", "labels", "scores"}` per image and no losses.
        """
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if not self.training and self.box_score == "object":
            sizes = [len(p) for p in proposals]
            boxes = self.box_coder.decode(box_regression, proposals).split(sizes)
            scores = F.softmax(class_logits, -1).split(sizes)
            return [object_detections(b, s, shape, self.score_thresh, self.nms_thresh, self.detections_per_img)
                    for b, s, shape in zip(boxes, scores, image_shapes)], {}, None
        if not self.training:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            return [{"boxes": b, "labels": c, "scores": s} for b, s, c in zip(boxes, scores, labels)], {}, None
        loss_classifier, loss_box_reg = self.box_losses(class_logits, box_regression, proposals, labels,
                                                        regression_targets, targets, self.box_coder)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}, (proposals, matched_idxs, labels)

    def predict_mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor],
                            image_shapes: list[tuple[int, int]]) -> Tensor:
        mask_features = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        if isinstance(self.mask_predictor, TransferMaskPredictor):
            return self.mask_predictor(mask_features, self.class_box_predictor())
        return self.mask_predictor(mask_features)

    def mask_loss(self, features: dict[str, Tensor], image_shapes: list[tuple[int, int]], targets: list[dict],
                  sampled: tuple) -> Tensor:
        """Partial-supervision mask loss on the foreground RoIs among the sampled ones."""
        sampled_proposals, matched_idxs, labels = sampled
        mask_boxes, roi_labels, mask_targets = [], [], []
        for props, idxs, lab, target in zip(sampled_proposals, matched_idxs, labels, targets):
            pos = torch.where(lab > 0)[0]  # masks are learned on foreground RoIs only
            mask_boxes.append(props[pos])
            roi_labels.append(target["labels"][idxs[pos]])
            mask_targets.append((props[pos], idxs[pos], target["masks"]))
        mask_logits = self.predict_mask_logits(features, mask_boxes, image_shapes)
        size = mask_logits.shape[-1]
        targets_mm = torch.cat([project_masks_on_boxes(m, b, i, size) for b, i, m in mask_targets], dim=0)
        return partial_mask_loss(mask_logits, torch.cat(roi_labels), targets_mm, self.mask_supervised)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None or (self.mask_loss_on and any("masks" not in t for t in targets)):
                raise ValueError("training targets need 'boxes', 'labels' and 'masks'")
        result, losses, sampled = self.forward_box(features, proposals, image_shapes, targets)
        if self.training:
            if self.mask_loss_on:
                losses["loss_mask"] = self.mask_loss(features, image_shapes, targets, sampled)
            return result, losses
        mask_logits = self.predict_mask_logits(features, [r["boxes"] for r in result], image_shapes)
        labels = torch.cat([r["labels"] for r in result])
        channel = labels if mask_logits.shape[1] > 1 else torch.zeros_like(labels)
        probs = mask_logits[torch.arange(labels.shape[0], device=labels.device), channel].sigmoid()[:, None]
        for r, p in zip(result, probs.split([len(r["labels"]) for r in result])):
            r["masks"] = p  # (n, 1, M, M); pasted into the image by the model's transform
        return result, losses
