"""ResNet-50 backbone weights from a path: torchvision ImageNet, DINO or MoCo checkpoints, or `none`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from utils.errors import UserError

# Prefixes used by the common self-supervised releases; stripped in this order.
_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.backbone.", "module.",
             "encoder_q.", "backbone.body.", "backbone.", "encoder.")


def load_resnet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ResNet checkpoint and return torchvision-style keys (`conv1.weight`, `layer1.0...`), no `fc`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path} (pass a file path, or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"cannot read backbone weights {path}: {exc}") from None
    for key in ("state_dict", "model", "teacher", "student"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"backbone weights {path}: expected a state dict")
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
