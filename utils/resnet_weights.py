"""ResNet-50 backbone weights from a path: torchvision ImageNet, DINO or MoCo checkpoints, or `none`."""
from __future__ import annotations

import os

import torch

from utils.checkpoint import read_torch_file
from utils.errors import UserError

# Prefixes used by the common self-supervised releases; stripped in this order.
_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.backbone.", "module.",
             "encoder_q.", "backbone.body.", "backbone.", "encoder.")


def load_resnet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ResNet checkpoint and return torchvision-style keys (`conv1.weight`, `layer1.0...`), no `fc`."""
    state = read_torch_file(path, "backbone weights", hint="pass a file path, or 'none'")
    for key in ("state_dict", "model", "teacher", "student"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(("fc.", "head.")) or not torch.is_tensor(value):
            continue
        cleaned[key] = value
    if "conv1.weight" not in cleaned:
        raise UserError(f"backbone weights {path} do not look like a ResNet (no conv1.weight)")
    return cleaned
