"""State dicts of released and saved checkpoints: the one key-cleaner, and a whole one-line account of why
a state dict does not fit a model (torch's own message spans many lines and starts with a colon-ended line)."""
from __future__ import annotations

import torch

WRAPPER_KEYS = ("teacher", "student", "state_dict", "model")  # DINO, MoCo / torchvision references, ours
# Prefixes of DDP, DINO, MoCo v2/v3 and torchvision-detection checkpoints; stripped repeatedly, in any order.
WRAPPER_PREFIXES = ("module.", "backbone.", "body.", "encoder_q.", "base_encoder.", "encoder.")


def unwrap_state_dict(state: dict, drop: tuple[str, ...] = ("fc.", "head.")) -> dict[str, torch.Tensor]:
    """The backbone's own keys from any common checkpoint layout: the inner dict of a training checkpoint
    (teacher first), without wrapper prefixes, classification heads (`drop`) and non-tensor entries."""
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    cleaned = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key.startswith(drop) or not torch.is_tensor(value):
            continue
        cleaned[key] = value
    return cleaned


def state_dict_mismatch(expected: dict, given: dict, ignore_unexpected: bool = False) -> str | None:
    """None when `given` fits `expected` (key names and shapes); else one line naming the first of each problem."""
    missing = [k for k in expected if k not in given]
    unexpected = [] if ignore_unexpected else [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {k} is {tuple(given[k].shape)} in the checkpoint "
                        f"but {tuple(expected[k].shape)} in the model")
    return "; ".join(problems) or None
