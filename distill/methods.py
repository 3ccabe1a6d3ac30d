"""The discovery methods of `gen_masks.py --method`, behind one interface.

A method is `propose(features, params) -> masks`: the backbone features of a batch
(`PatchFeatures`) in, a list of scored patch masks (`PatchMask`) per image out, plus, where the
official recipe has one, a pixel-level `refine` step that the engine runs in its post-processing
workers (MaskCut's CRF). The engine (`distill.engine`) owns batching, precision, the input
resize, post-processing, output and resume; a method module owns only its algorithm.

Each method carries the defaults of its official code: its parameters and its input policy.

| method      | parameters (default)                        | input (default)                                  |
|-------------|---------------------------------------------|--------------------------------------------------|
| maskdistill | heads 5, topk 0.4                           | shorter side 640 (bilinear), zero-padded         |
| lost        | k_patches 100                               | full resolution, zero-padded                     |
| tokencut    | tau 0.2, foreground eigenvector             | full resolution, zero-padded                     |
| maskcut     | num_objects 3, tau 0.15, foreground eigenvector, mask_score official | fixed_size 480 (square LANCZOS), CRF on the masks |

The methods were designed on DINO; for another backbone family a method may replace some of these
defaults and the backbone's feature setting (`Method.family_defaults`, measured in docs/dinov2.md):

| method on DINOv2 | replaced defaults                                                    |
|------------------|----------------------------------------------------------------------|
| maskdistill      | none (features: the backbone's `centred` keys)                       |
| lost             | features `centred_tokens`, shorter side 320                          |
| tokencut         | foreground `attention` (features: `centred` keys)                    |
| maskcut          | foreground `attention`, mask_score `attention` (features: `centred` keys) |

`method_defaults(method, arch)` gives the result; flags given explicitly still win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from distill.data import Geometry, upsample_patch_mask
from distill.features import discovery_features, feature_setting, needs_tokens
from distill.lost import lost
from distill.maskcut import attention_scores, maskcut, refine_masks
from distill.maskgen import class_token_scores, propose_masks
from distill.patches import PatchFeatures, PatchMask
from distill.tokencut import tokencut
from utils.vit import LastBlockQK, backbone_spec
from utils.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    propose: Callable[[PatchFeatures, dict], list[list[PatchMask]]]
    params: dict  # flag name -> official default
    resize: int = 0  # default shorter side (0: full resolution)
    fixed_size: int = 0  # default square size (0: none)
    # Pixel-level steps on the resized image: (working uint8 image, proposals, geometry) -> one
    # original-size mask per proposal, or None where it is dropped.
    refine: Callable[[np.ndarray, list[PatchMask], Geometry], list[np.ndarray | None]] | None = None
    score: str = field(default="")  # what the score means, for --help
    # Backbone family ("DINOv2") -> defaults that replace the official ones on it: parameters,
    # "resize"/"fixed_size" and "features" (otherwise the backbone's own, `BackboneSpec.features`).
    family_defaults: dict[str, dict] = field(default_factory=dict)


def _maskdistill(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in propose_masks(features.query, features.key, *features.grid, heads=params["heads"],
                                       topk=params["topk"], graph_key=features.graph_key)]


def _lost(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in lost(features.patch_keys, features.grid, k_patches=params["k_patches"])]


def _cls_attention(features: PatchFeatures, params: dict) -> torch.Tensor | None:
    """The CLS scores of the patches (G_cls over all heads) for `foreground attention`, else None."""
    if params["foreground"] == "eigenvector":
        return None
    return class_token_scores(features.query, features.key, features.key.shape[1])


def _tokencut(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    return [[m] for m in tokencut(features.patch_keys, features.grid, tau=params["tau"],
                                  attention=_cls_attention(features, params))]


def _maskcut(features: PatchFeatures, params: dict) -> list[list[PatchMask]]:
    masks = maskcut(features.patch_keys, features.grid, num_objects=params["num_objects"], tau=params["tau"],
                    attention=_cls_attention(features, params))
    if params["mask_score"] == "attention":
        masks = attention_scores(masks, class_token_scores(features.query, features.key, features.key.shape[1]))
    return masks


METHODS: dict[str, Method] = {
    "maskdistill": Method("maskdistill", _maskdistill, {"heads": 5, "topk": 0.4}, resize=640,
                          score="share of the thresholded CLS-attention mass inside the mask"),
    # DINOv2: LOST's degrees and seed expansion work on the centred output tokens at the patch grid of
    # its official runs (DINO /16 on VOC's ~500x375 images: 23 rows), not at full resolution.
    "lost": Method("lost", _lost, {"k_patches": 100}, score="1 - Ncut/2 of the mask on LOST's graph",
                   family_defaults={"DINOv2": {"features": "centred_tokens", "resize": 320}}),
    # DINOv2: the official foreground rules pick the background side of some cuts; the CLS attention does not.
    "tokencut": Method("tokencut", _tokencut, {"tau": 0.2, "foreground": "eigenvector"},
                       score="1 - Ncut/2 of the mask on its graph",
                       family_defaults={"DINOv2": {"foreground": "attention"}}),
    # DINOv2: the CLS-attention score ranks the object first more often than 1 - Ncut/2 (docs/dinov2.md).
    "maskcut": Method("maskcut", _maskcut, {"num_objects": 3, "tau": 0.15, "foreground": "eigenvector",
                                            "mask_score": "official"},
                      fixed_size=480, refine=refine_masks,
                      score="official: 1 - Ncut/2 of the patch mask on the image's unmasked graph; attention: "
                            "mean CLS attention over the mask's patches, scaled to [0, 1] per image",
                      family_defaults={"DINOv2": {"foreground": "attention", "mask_score": "attention"}}),
}
METHOD_PARAMS = tuple(dict.fromkeys(name for method in METHODS.values() for name in method.params))


def method_defaults(method: str, arch: str) -> dict:
    """The defaults of `method` on `arch`: its parameters, "resize", "fixed_size" and "features" (a
    setting of `distill.features`), the official ones unless the arch's family replaces them."""
    spec = METHODS[method]
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
    (None) of `given` (flag name -> value, for any of `METHOD_PARAMS`), so that the recorded settings are
    the ones used; refuse flags that belong to another method.

    Input: `--fixed_size` and `--resize` exclude each other; without either, the method's own policy."""
    method = METHODS[name]
    defaults = method_defaults(name, arch)
    params = {}
    for flag in METHOD_PARAMS:
        value = given.get(flag)
        if flag in method.params:
            params[flag] = defaults[flag] if value is None else value
        elif value is not None:
            users = [m for m in METHODS if flag in METHODS[m].params]
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
