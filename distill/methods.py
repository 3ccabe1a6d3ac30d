"""The discovery methods as a run uses them: their defaults on a backbone, resolved flags, and the steps around
`Method.propose` (features in, chunked proposals, pixel masks out).

The methods themselves, their parameters and input policies are registered in `distill.registry` (one module
each: distill/maskgen.py, lost.py, tokencut.py, maskcut.py); `method_defaults(method, arch)` gives a method's
defaults on a backbone family; flags given explicitly still win (`resolve_method`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from distill.data import Geometry, upsample_patch_mask
from distill.features import discovery_features, feature_setting, needs_tokens
from distill.patches import PatchFeatures, PatchMask
from distill.registry import Method, load_method, method_names
from utils.vit import LastBlockQK
from utils.vit_archs import backbone_spec
from utils.errors import UserError


def method_params() -> tuple[str, ...]:
    """The parameter flags of every registered method, each once."""
    return tuple(dict.fromkeys(name for method in map(load_method, method_names()) for name in method.params))


def method_defaults(method: str, arch: str) -> dict:
    """The defaults of `method` on `arch`: its parameters, "resize", "fixed_size" and "features" (a
    setting of `distill.features`), the official ones unless the arch's family replaces them."""
    spec = load_method(method)
    return {**spec.params, "resize": spec.resize, "fixed_size": spec.fixed_size, "features": feature_setting(arch),
            **spec.family_defaults.get(backbone_spec(arch).family, {})}


def method_features(method: str, arch: str, requested: str = "auto") -> str:
    """The feature setting `--features requested` means for `method` on `arch`: `auto` is the method's default on
    the arch's family (`method_defaults`), anything else is checked and kept."""
    return method_defaults(method, arch)["features"] if requested == "auto" else feature_setting(arch, requested)


@dataclass(frozen=True)
class MethodSettings:
    """A method with its resolved parameters and input policy (`resolve_method`)."""

    name: str
    params: dict  # the method's parameters: flag name -> value
    resize: int  # shorter side (0: the size as it is)
    fixed_size: int  # square size (0: none)
    max_size: int  # cap on the longer side


def resolve_method(name: str, arch: str, given: Mapping[str, object], resize: int | None, fixed_size: int | None,
                   max_size: int, patch_size: int) -> MethodSettings:
    """The method's settings on `arch`: its defaults there (`method_defaults`) for the parameters left out
    (None) of `given` (flag name -> value, for any of `method_params()`), so that the recorded settings are
    the ones used; refuse flags that belong to another method.

    Input: `--fixed_size` and `--resize` exclude each other; without either, the method's own policy."""
    method = load_method(name)
    defaults = method_defaults(name, arch)
    params = {}
    for flag in method_params():
        value = given.get(flag)
        if flag in method.params:
            params[flag] = defaults[flag] if value is None else value
        elif value is not None:
            users = [m for m in method_names() if flag in load_method(m).params]
            raise UserError(f"--{flag} applies to --method {' or '.join(users)}, not {name}")
    if fixed_size is not None and resize is not None:
        raise UserError("--resize and --fixed_size exclude each other: give one of them")
    if fixed_size is None:
        fixed_size = defaults["fixed_size"] if resize is None else 0
    if resize is None:
        resize = 0 if fixed_size else defaults["resize"]
    if fixed_size and fixed_size < patch_size:
        raise UserError(f"--fixed_size {fixed_size} is smaller than the patch size {patch_size}")
    if resize and resize >= max_size:
        raise UserError(f"--max_size {max_size} must be larger than --resize {resize}")
    return MethodSettings(name, params, resize, fixed_size, max_size)


GRAPH_BUDGET = 2**30  # bytes of N x N float64 patch graphs a method may hold at once


def propose(method: Method, features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    """`method.propose` over the batch, in chunks of images whose patch graphs fit in `GRAPH_BUDGET`
    (full-resolution LOST/TokenCut on large images have graphs of 1 GB and more per image)."""
    batch, num_patches = features.key.shape[0], features.grid[0] * features.grid[1]
    chunk = max(1, GRAPH_BUDGET // (16 * num_patches * num_patches))
    if chunk >= batch:
        return method.propose(features, params)
    return [masks for start in range(0, batch, chunk)
            for masks in method.propose(PatchFeatures(features.query[start:start + chunk],
                                                      features.key[start:start + chunk], features.grid,
                                                      features.graph_key[start:start + chunk]), params)]


def backbone_features(model: torch.nn.Module, images: torch.Tensor, setting: str) -> PatchFeatures:
    """Backbone output -> the methods' input: the one place where a backbone's features are taken, with
    the per-backbone transform of `--features` (`distill.features`: DINOv2's keys are centred)."""
    patch_size = model.patch_size
    grid = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    return patch_features(model.last_qk(images, tokens=needs_tokens(setting)), setting, grid)


def patch_features(qk: LastBlockQK, setting: str, grid: tuple[int, int]) -> PatchFeatures:
    """The methods' input from one backbone output (`model.last_qk`) under the feature `setting`."""
    features = discovery_features(qk, setting)
    return PatchFeatures(query=features.query, key=features.key, grid=grid, graph_key=features.graph_key)


def pixel_masks(method: Method, working: np.ndarray | None, proposals: list[PatchMask],
                geometry: Geometry) -> list[np.ndarray | None]:
    """One original-size mask per proposal: the method's `refine` on the resized image, or a nearest
    upsampling of the patch mask (None where `refine` drops a proposal)."""
    if method.refine is not None:
        return method.refine(working, proposals, geometry)
    return [upsample_patch_mask(p.mask, geometry) for p in proposals]
