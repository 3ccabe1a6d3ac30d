"""Mask heads for partial supervision ("Learning to Segment Every Thing", Hu et al. 2018).

`TransferMaskPredictor` predicts each class's mask weights from a vector describing that class,
w_seg^c = T(w_det^c; theta), with one class-agnostic T, so a class that never had a mask in
training (set B) still gets a mask predictor. The class vector is the class's box-head weights
(`cls`, `box`, `cls+box`) or a fixed vector (`randn`: seeded Gaussian; `embedding`: read from a
file such as GloVe). `MLPMaskBranch` is the fused class-agnostic MLP mask branch whose single
logit map is added to every class's FCN logits; `AgnosticMLPMaskPredictor` is the paper's
"class-agnostic+MLP" baseline.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from utils.errors import UserError

BOX_WEIGHT_INPUTS = ("cls", "box", "cls+box")  # w_det taken from the box predictor
FIXED_INPUTS = ("randn", "embedding")  # w_det is a fixed vector per class, not learned
TRANSFER_INPUTS = BOX_WEIGHT_INPUTS + FIXED_INPUTS
ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1)}


def random_class_vectors(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """`randn` input: one fixed N(0, 1) vector per class, (num_classes, dim), row 0 (background) zero.

    Drawn from its own generator, so the vectors depend only on (num_classes, dim, seed).
    """
    if dim < 1:
        raise ValueError(f"randn_dim must be at least 1, got {dim}")
    vectors = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(int(seed)))
    vectors[0] = 0.0
    return vectors


def _normalise_name(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def read_class_embeddings(path: str | os.PathLike, class_names: list[str]) -> torch.Tensor:
    """`embedding` input: the vectors of `class_names` from a text file, (1 + len(class_names), D).

    One line per entry: `NAME v1 v2 ... vD`, where NAME may contain spaces or underscores
    (`dining table`, `dining_table`); matching ignores case. A GloVe file works as it is: a class
    whose name has no line of its own gets the mean of its words' vectors. Row 0 (background) is
    zero. Only the lines of the wanted names are parsed, so a full GloVe file is fine.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class embedding file not found: {path}")
    wanted = {_normalise_name(n) for n in class_names}
    words = {w for name in wanted for w in name.split()}  # for names without a line of their own
    found: dict[str, tuple[int, list[float]]] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            first = _normalise_name(line.split(maxsplit=1)[0]) if line.strip() else ""
            if first.split(" ", 1)[0] not in words:  # cheap skip of the other lines of a GloVe file
                continue
            tokens = line.split()
            values: list[float] = []
            while tokens:  # the trailing numbers are the vector, the rest is the name
                try:
                    values.append(float(tokens[-1]))
                except ValueError:
                    break
                tokens.pop()
            name = _normalise_name(" ".join(tokens))
            if name not in wanted and name not in words:
                continue
            values.reverse()
            if not values:
                raise UserError(f"{path}:{line_no}: {name!r} has no vector values")
            if dim is not None and len(values) != dim:
                raise UserError(f"{path}:{line_no}: {name!r} has {len(values)} values, but earlier lines have {dim}")
            if not all(math.isfinite(v) for v in values):
                raise UserError(f"{path}:{line_no}: the vector of {name!r} holds NaN or infinite values")
            if name in found:
                raise UserError(f"{path}:{line_no}: {name!r} appears twice (first on line {found[name][0]})")
            dim = len(values)
            found[name] = (line_no, values)
    rows = []
    for original in class_names:
        key = _normalise_name(original)
        if key in found:
            rows.append(torch.tensor(found[key][1]))
            continue
        missing = [w for w in key.split() if w not in found]
        if missing:
            detail = f" (nor for its word {missing[0]!r})" if " " in key else ""
            raise UserError(f"class embedding file {path} has no vector for class {original!r}{detail}")
        rows.append(torch.tensor([found[w][1] for w in key.split()]).mean(dim=0))
    return torch.cat([torch.zeros(1, dim), torch.stack(rows)]).float()


def class_embeddings(box_predictor: nn.Module, kind: str = "cls+box") -> torch.Tensor:
    """w_det^c for every class c, shape (K, D): the classifier row and/or the 4 box-regression rows.

    `box_predictor` is torchvision's FastRCNNPredictor (`cls_score`, `bbox_pred` linear layers,
    class-specific box regression laid out as 4 consecutive rows per class).
    """
    cls_w = box_predictor.cls_score.weight  # (K, R)
    if kind == "cls":
        return cls_w
    num_classes, rep = cls_w.shape
    box_w = box_predictor.bbox_pred.weight.reshape(num_classes, 4 * rep)  # rows 4c..4c+3 -> class c
    if kind == "box":
        return box_w
    if kind == "cls+box":
        return torch.cat([cls_w, box_w], dim=1)
    raise ValueError(f"box-weight transfer input must be one of {BOX_WEIGHT_INPUTS}, got {kind!r}")


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


class AgnosticMLPMaskPredictor(MaskRCNNPredictor):
    """The "class-agnostic+MLP" baseline: one FCN mask logit map plus the fused MLP branch's."""

    def __init__(self, in_channels: int, dim_reduced: int, roi_size: int):
        super().__init__(in_channels, dim_reduced, 1)
        self.mlp_branch = MLPMaskBranch(in_channels, roi_size, 2 * roi_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MaskRCNNPredictor is a Sequential: its own forward would run mlp_branch as a layer
        logits = self.mask_fcn_logits(self.relu(self.conv5_mask(x)))
        return logits + self.mlp_branch(x)[:, None].to(logits.dtype)


class TransferMaskPredictor(nn.Module):
    """Mask predictor whose per-class 1x1 weights come from a class vector through T.

    Same input and output as torchvision's MaskRCNNPredictor ((N, C, S, S) -> (N, K, 2S, 2S)),
    but forward also takes the box predictor. With a box-weight input (`cls`, `box`, `cls+box`)
    its class weights are detached unless `transfer_grad` (the ablation that lets the mask loss
    reach the box head). With a fixed input (`randn`, `embedding`) `class_vectors` (K, D) holds the
    vectors; they are a buffer of the model (saved in checkpoints), never trained.
    """

    def __init__(self, in_channels: int, dim_reduced: int, representation_size: int, roi_size: int,
                 transfer_input: str = "cls+box", num_layers: int = 2, hidden_dim: int = 1024,
                 activation: str = "leaky_relu", transfer_grad: bool = False, fused_mlp: bool = True,
                 class_vectors: torch.Tensor | None = None):
        super().__init__()
        if transfer_input not in TRANSFER_INPUTS:
            raise ValueError(f"transfer input must be one of {TRANSFER_INPUTS}, got {transfer_input!r}")
        if (transfer_input in FIXED_INPUTS) != (class_vectors is not None):
            raise ValueError(f"transfer input {transfer_input!r} "
                             + ("needs class_vectors" if class_vectors is None else "takes no class_vectors"))
        self.transfer_input = transfer_input
        self.transfer_grad = transfer_grad
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        if class_vectors is not None:
            self.register_buffer("class_vectors", class_vectors.float().clone())
            in_dim = class_vectors.shape[1]
        else:
            self.class_vectors = None
            in_dim = embedding_dim(representation_size, transfer_input)
        # T outputs the 1x1 conv weights and the bias of each class's mask logit.
        self.weight_transfer = build_weight_transfer(in_dim, dim_reduced + 1, num_layers, hidden_dim, activation)
        self.mlp_branch = MLPMaskBranch(in_channels, roi_size, 2 * roi_size) if fused_mlp else None

    def class_mask_weights(self, box_predictor: nn.Module) -> torch.Tensor:
        """w_seg^c = T(w_det^c) for all classes, shape (K, dim_reduced + 1)."""
        if self.class_vectors is not None:
            return self.weight_transfer(self.class_vectors)
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
