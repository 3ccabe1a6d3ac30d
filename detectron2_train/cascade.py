"""Cascade Mask R-CNN heads (Cai & Vasconcelos 2018), as CutLER trains them, on torchvision's RoIHeads.

Three box stages (by default) refine the boxes in turn. Stage k pools the boxes regressed by
stage k - 1 (stage 0 pools the sampled RPN proposals plus the GT boxes), and matches them to the
ground truth at a higher IoU (0.5 / 0.6 / 0.7) with tighter box-coder weights
(10, 10, 5, 5) x (k + 1). Each stage has its own TwoMLPHead and predictor with class-agnostic box
regression. As in detectron2's cascade:
  * stages after the first do not resample: every box of the previous stage is matched and
    labelled (boxes that became empty are dropped in training);
  * the gradient reaching the shared RoI features is divided by the number of stages;
  * at test time each proposal's class scores are the mean of the stages' softmax scores, and
    its box is the last stage's.
The mask branch (and DropLoss, per stage) is MaskRoIHeads': it trains on the first stage's
sampled positives and runs on the final detections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import box_iou, boxes as box_ops

from detectron2_train.roi_heads import MaskRoIHeads, object_detections

BASE_BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class AgnosticBoxPredictor(FastRCNNPredictor):
    """FastRCNNPredictor with one box regression for all classes: (N, K) scores, (N, 4) deltas."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


class CascadeRoIHeads(MaskRoIHeads):
    """Cascade box heads (`box_head`, `box_predictor` are ModuleLists, one entry per stage)."""

    def __init__(self, *args, stage_heads: list[nn.Module], stage_predictors: list[nn.Module],
                 stage_ious: list[float], **kwargs):
        super().__init__(*args, **kwargs)
        if not len(stage_heads) == len(stage_predictors) == len(stage_ious) >= 1:
            raise ValueError("the cascade needs one box head, predictor and IoU per stage")
        self.box_head = nn.ModuleList(stage_heads)
        self.box_predictor = nn.ModuleList(stage_predictors)
        self.stage_ious = [float(iou) for iou in stage_ious]
        self.stage_coders = [BoxCoder(tuple(w * (k + 1) for w in BASE_BOX_CODER_WEIGHTS))
                             for k in range(len(stage_ious))]
        self.stage_matchers = [Matcher(iou, iou, allow_low_quality_matches=False) for iou in self.stage_ious]

    @classmethod
    def from_roi_heads(cls, heads, num_classes, mask_classes=None, droploss_iou=None, **kwargs) -> "CascadeRoIHeads":
        new = super().from_roi_heads(heads, num_classes, mask_classes, droploss_iou, **kwargs)
        # stage 0 samples the RPN proposals with its own IoU and box coder
        new.proposal_matcher, new.box_coder = new.stage_matchers[0], new.stage_coders[0]
        return new

    @property
    def num_stages(self) -> int:
        return len(self.stage_ious)

    def class_box_predictor(self) -> nn.Module:
        return self.box_predictor[-1]

    def run_stage(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                  stage: int) -> tuple[Tensor, Tensor]:
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        if self.training and pooled.requires_grad:
            # the stages' losses add up on the shared features: average their gradients instead
            pooled.register_hook(lambda grad: grad / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](pooled))

    def next_proposals(self, boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The previous stage's boxes, without gradient, clipped; empty ones dropped in training only
        (at test time the stages' scores are averaged per proposal, so none may go)."""
        out = []
        for b, shape in zip(boxes, image_shapes):
            b = box_ops.clip_boxes_to_image(b.detach(), shape)
            if self.training:
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            out.append(b)
        return out

    def label_stage(self, proposals: list[Tensor], targets: list[dict], stage: int) -> tuple[list[Tensor], list[Tensor]]:
        """Labels (0 = background) and regression targets of every proposal at this stage's IoU."""
        labels, regression_targets = [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(len(props), dtype=torch.int64, device=props.device))
                regression_targets.append(torch.zeros_like(props))
                continue
            matched = self.stage_matchers[stage](box_iou(gt_boxes, props))
            safe = matched.clamp(min=0)
            lab = gt_labels[safe].clone()
            lab[matched < 0] = 0
            labels.append(lab)
            regression_targets.append(self.stage_coders[stage].encode_single(gt_boxes[safe], props))
        return labels, regression_targets

    def forward_box(self, features, proposals, image_shapes, targets=None):
        sampled = None
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            sampled = (proposals, matched_idxs, labels)
        losses: dict[str, Tensor] = {}
        stage_scores = []
        boxes: list[Tensor] = []
        for stage in range(self.num_stages):
            if stage > 0:
                proposals = self.next_proposals(boxes, image_shapes)
                if self.training:
                    labels, regression_targets = self.label_stage(proposals, targets, stage)
            class_logits, box_regression = self.run_stage(features, proposals, image_shapes, stage)
            decoded = self.stage_coders[stage].decode(box_regression, proposals)[:, 0]
            boxes = list(decoded.split([len(p) for p in proposals]))
            if self.training:
                loss_cls, loss_box = self.box_losses(class_logits, box_regression, proposals, labels,
                                                     regression_targets, targets, self.stage_coders[stage])
                losses[f"loss_classifier_stage{stage}"] = loss_cls
                losses[f"loss_box_reg_stage{stage}"] = loss_box
            else:
                stage_scores.append(F.softmax(class_logits, -1))
        if self.training:
            return [], losses, sampled
        scores = torch.stack(stage_scores).mean(dim=0)
        return self.detections(boxes, scores.split([len(b) for b in boxes]), image_shapes), {}, None

    def detections(self, boxes: list[Tensor], scores: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[dict]:
        """Per image: one candidate per (box, foreground class), score threshold, per-class NMS, top k
        (torchvision's postprocess_detections for one class-agnostic box per proposal)."""
        if self.box_score == "object":
            return [object_detections(b, s, shape, self.score_thresh, self.nms_thresh, self.detections_per_img)
                    for b, s, shape in zip(boxes, scores, image_shapes)]
        result = []
        for b, s, shape in zip(boxes, scores, image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            num_fg = s.shape[1] - 1
            labels = torch.arange(1, num_fg + 1, device=s.device).repeat(len(b))
            b, s = b.repeat_interleave(num_fg, dim=0), s[:, 1:].reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            result.append({"boxes": b[keep], "labels": labels[keep], "scores": s[keep]})
        return result
