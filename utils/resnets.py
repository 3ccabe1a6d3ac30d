"""ResNet backbones shared by the trainers: the tiny test ResNet, and backbone weights from `none`,
`imagenet` (torchvision's official checkpoints) or a path to a torchvision / DINO / MoCo checkpoint."""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet

from utils.checkpoint import read_torch_file
from utils.errors import UserError
from utils.state_dicts import state_dict_mismatch, unwrap_state_dict

IMAGENET_WEIGHTS = {  # torchvision's official ImageNet checkpoints, for weights `imagenet`
    "resnet18": resnet.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": resnet.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": resnet.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": resnet.ResNet101_Weights.IMAGENET1K_V1,
}
TINY_WIDTHS = (16, 32, 64, 128)


class TinyResNet(nn.Module):
    """A four-stage ResNet of single BasicBlocks (strides 4..32), for tests and quick CPU runs.

    It has torchvision's ResNet layout (`conv1`, `bn1`, `relu`, `maxpool`, `layer1..4`), so torchvision's
    feature extractors (FPN, IntermediateLayerGetter) and the weight loader below take it as they take a ResNet.
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = TINY_WIDTHS,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != width:
                down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), norm_layer(width))
            setattr(self, f"layer{i + 1}", nn.Sequential(resnet.BasicBlock(in_ch, width, stride, down,
                                                                           norm_layer=norm_layer)))
            in_ch = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def load_resnet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ResNet checkpoint and return torchvision-style keys (`conv1.weight`, `layer1.0...`), no `fc`."""
    state = unwrap_state_dict(read_torch_file(path, "backbone weights", hint="pass a file path, or 'none'"))
    if "conv1.weight" not in state:
        raise UserError(f"backbone weights {path} do not look like a ResNet (no conv1.weight)")
    return state


def load_resnet_weights(body: nn.Module, name: str, weights: str | None) -> None:
    """Load `none` (nothing), `imagenet` (torchvision's official URL) or a checkpoint path into a ResNet body
    (its `fc` is never loaded). A checkpoint that does not fit is one whole error line."""
    if weights in (None, "", "none"):
        return
    if weights == "imagenet":
        if name not in IMAGENET_WEIGHTS:
            raise UserError(f"no ImageNet weights for backbone {name!r}; use 'none' or a path")
        try:
            state = IMAGENET_WEIGHTS[name].get_state_dict(progress=True)
        except Exception as exc:  # offline machines, proxy errors
            raise UserError(f"cannot download ImageNet weights for {name} ({type(exc).__name__}); download "
                            f"{IMAGENET_WEIGHTS[name].url} and pass its path as the backbone weights") from None
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        source = f"torchvision ImageNet weights for {name}"
    else:
        state = load_resnet_state_dict(weights)
        source = f"backbone weights {weights}"
    expected = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
    problem = state_dict_mismatch(expected, state, ignore_unexpected=True)
    if problem:
        raise UserError(f"{source} do not fit a {name}: {problem}")
    body.load_state_dict(state, strict=False)
