"""Mask heads for partial supervision ("Learning to Segment Every Thing", Hu et al. 2018).

`TransferMaskPredictor` predicts each class's mask weights from that class's box-head weights,
w_seg^c = T(w_det^c; theta), with one class-agnostic T, so a class that never had a mask in
training (set B) still gets a mask predictor. `MLPMaskBranch` is the fused class-agnostic MLP
mask branch whose single logit map is added to every class's FCN logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TRANSFER_INPUTS = ("cls", "box", "cls+box")
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1)}


def class_embeddings(box_predictor: nn.Module, kind: str = "cls+box") -> torch.Tensor:
    """w_det^c for every class c, shape (K, D): the classifier row and/or the 4 box-regression rows.

    `box_predictor` is torchvision's FastRCNNPredictor (`cls_score`, `bbox_pred` linear layers,
    class-specific box regression laid out as 4 consecutive rows per class).
    """
    cls_w = box_predictor.cls_score.weight  # (K, R)
    num_classes, rep = cls_w.shape
    box_w = box_predictor.bbox_pred.weight.reshape(num_classes, 4 * rep)  # rows 4c..4c+3 -> class c
    if kind == "cls":
        return cls_w
    if kind == "box":
        return box_w
    if kind == "cls+box":
        return torch.cat([cls_w, box_w], dim=1)
    raise ValueError(f"transfer input must be one of {TRANSFER_INPUTS}, got {kind!r}")


def embedding_dim(representation_size: int, kind: str) -> int:
    return {"cls": 1, "box": 4, "cls+box": 5}[kind] * representation_size


def build_weight_transfer(in_dim: int, out_dim: int, num_layers: int = 2, hidden_dim: int = 1024,
                          activation: str = "leaky_relu") -> nn.Sequential:
    """The class-agnostic transfer function T: `num_layers` linear layers with activations between."""
    if num_layers not in (1, 2, 3):
        raise ValueError(f"transfer layers must be 1, 2 or 3, got {num_layers}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"transfer activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPMaskBranch(nn.Module):
    """Class-agnostic MLP mask branch (PANet-style): conv, then a fc layer to one M x M logit map."""

    def __init__(self, in_channels: int, roi_size: int, out_size: int, reduced_channels: int | None = None):
        super().__init__()
        reduced_channels = reduced_channels or max(in_channels // 2, 1)
        self.conv = nn.Conv2d(in_channels, reduced_channels, 3, padding=1)
        self.fc = nn.Linear(reduced_channels * roi_size * roi_size, out_size * out_size)
        self.out_size = out_size
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, S, S) -> (N, M, M)
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc(x).view(-1, self.out_size, self.out_size)


class TransferMaskPredictor(nn.Module):
    """Mask predictor whose per-class 1x1 weights come from the box head through T.

    Same input and output as torchvision's MaskRCNNPredictor ((N, C, S, S) -> (N, K, 2S, 2S)),
    but forward also takes the box predictor, whose class weights are detached unless
    `transfer_grad` (the ablation that lets the mask loss reach the box head).
    """

    def __init__(self, in_channels: int, dim_reduced: int, representation_size: int, roi_size: int,
                 transfer_input: str = "cls+box", num_layers: int = 2, hidden_dim: int = 1024,
                 activation: str = "leaky_relu", transfer_grad: bool = False, fused_mlp: bool = True):
        super().__init__()
        if transfer_input not in TRANSFER_INPUTS:
            raise ValueError(f"transfer input must be one of {TRANSFER_INPUTS}, got {transfer_input!r}")
        self.transfer_input = transfer_input
        self.transfer_grad = transfer_grad
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        # T outputs the 1x1 conv weights and the bias of each class's mask logit.
        self.weight_transfer = build_weight_transfer(embedding_dim(representation_size, transfer_input),
                                                     dim_reduced + 1, num_layers, hidden_dim, activation)
        self.mlp_branch = MLPMaskBranch(in_channels, roi_size, 2 * roi_size) if fused_mlp else None

    def class_mask_weights(self, box_predictor: nn.Module) -> torch.Tensor:
        """w_seg^c = T(w_det^c) for all classes, shape (K, dim_reduced + 1)."""
        w_det = class_embeddings(box_predictor, self.transfer_input)
        if not self.transfer_grad:
            w_det = w_det.detach()  # stop-gradient: the mask loss must not move the box head
        return self.weight_transfer(w_det)

    def forward(self, x: torch.Tensor, box_predictor: nn.Module) -> torch.Tensor:
        features = F.relu(self.conv5_mask(x))  # (N, D, M, M)
        w_seg = self.class_mask_weights(box_predictor).to(features.dtype)
        logits = torch.einsum("ndhw,kd->nkhw", features, w_seg[:, :-1]) + w_seg[:, -1][None, :, None, None]
        if self.mlp_branch is not None:
            logits = logits + self.mlp_branch(x)[:, None].to(logits.dtype)
        return logits
