"""Checkpoints: model, optimizer, scheduler, AMP scaler, iteration, config, settings fingerprint and RNG states,
written atomically. Periodic ones are `model_XXXXXXX.pth` (the iteration, 7 digits)."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.coco_io import atomic_path
from utils.errors import UserError
from utils.state_dicts import state_dict_mismatch


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None,
                    scheduler: Any = None, iteration: int = 0, config: dict | None = None,
                    extra: dict | None = None, scaler: Any = None, fingerprint: dict | None = None) -> None:
    """Write everything an exact resume needs; `fingerprint` (utils/fingerprint.py) lets a resume check settings."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "config": config,
        "fingerprint": fingerprint,
        "rng": rng_states(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_torch_file(path: str | os.PathLike, what: str, hint: str = "") -> dict:
    """The dict saved in a `torch.save` file (on the CPU), or a UserError naming the file.

    `what` names the file in the messages ("checkpoint", "backbone weights", ...): `<what> not
    found: PATH (<hint>)`, `cannot read <what> PATH: <reason>`, `<what> PATH holds a <type>, not a dict`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        # Full unpickling: training checkpoints hold RNG states and configs, not only tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign files
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a dict")
    return state


# The kinds of checkpoint the trainers save (their fingerprint's `kind`): what each is, for messages, and the
# names its weights start with, to recognise a bare state dict or a checkpoint saved before fingerprints.
CHECKPOINT_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mask_rcnn": ("a Mask R-CNN checkpoint (detectron2_train/train_net.py)", ("roi_heads.", "rpn.")),
    # before DeepLab-v3, whose weights also start with "head."
    "pa_predictor": ("a PA predictor checkpoint (detectron2_train/train_affinity.py)", ("head.levels.", "head.fuse.")),
    "deeplab": ("a DeepLab-v3 checkpoint (segmentation/train.py)", ("head.",)),
    "linear_probe": ("a DeepLab-v3 linear-probe checkpoint (segmentation/linear_finetune.py)", ()),
}


def checkpoint_kind(state: dict) -> str | None:
    """The kind of job that saved a checkpoint (from `read_torch_file`): its fingerprint's kind, else the kind
    its weights' names show (`CHECKPOINT_KINDS`), else None (backbone weights, another tool's file)."""
    recorded = state.get("fingerprint")
    if isinstance(recorded, dict) and isinstance(recorded.get("kind"), str):
        return recorded["kind"]
    weights = state.get("model", state)
    names = [k.removeprefix("module.") for k in weights if isinstance(k, str)] if isinstance(weights, dict) else []
    for kind, (_, prefixes) in CHECKPOINT_KINDS.items():
        if prefixes and any(name.startswith(prefixes) for name in names):
            return kind
    return None


def require_checkpoint_kind(state: dict, path: str | os.PathLike, expected: tuple[str, ...]) -> None:
    """A UserError naming the kind found and the kinds expected when a checkpoint is of another known kind
    (e.g. a Mask R-CNN passed where a DeepLab-v3 is wanted); unrecognised files are left to the weight check."""
    kind = checkpoint_kind(state)
    if kind is None or kind in expected:
        return
    found = CHECKPOINT_KINDS[kind][0] if kind in CHECKPOINT_KINDS else f"a checkpoint made by {kind}"
    wanted = " or ".join(CHECKPOINT_KINDS[k][0] if k in CHECKPOINT_KINDS else k for k in expected)
    raise UserError(f"{path} is {found}; expected {wanted}")


def restore_checkpoint(state: dict, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None,
                       scaler: Any = None, restore_rng: bool = True) -> dict:
    """Put a checkpoint dict (from `read_torch_file`) back into the objects given; returns it.

    Weights that do not fit the model raise ValueError with one whole line (torch's message spans many
    and its first line ends at a colon)."""
    try:  # the model's own load_state_dict, which may have rules of its own
        unwrap(model).load_state_dict(state["model"])
    except RuntimeError:
        raise ValueError(state_dict_mismatch(unwrap(model).state_dict(), state["model"])
                         or "the weights do not fit the model") from None
    for target, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if target is not None and state.get(key):  # a disabled GradScaler saves {}
            target.load_state_dict(state[key])
    if restore_rng and state.get("rng") is not None:
        set_rng_states(state["rng"])
    return state


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint in place; returns the whole dict (iteration, config, extra)."""
    return restore_checkpoint(read_torch_file(path, "checkpoint"), model, optimizer, scheduler,
                              restore_rng=restore_rng)


def periodic_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The `model_XXXXXXX.pth` files of `directory`, oldest (lowest iteration) first."""
    found = []
    for p in Path(directory).glob("model_*.pth"):
        m = re.fullmatch(r"model_(\d+)\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The `model_XXXXXXX.pth` with the highest iteration in `directory`, or None."""
    found = periodic_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (`keep` <= 0 keeps them all)."""
    if keep > 0:
        for old in periodic_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
