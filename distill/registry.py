"""The discovery methods of `gen_masks.py --method`, by name, without torch: what `--help` needs is here, the
algorithm is imported when a run asks for it (`load_method`).

A method is one module that declares its `Method` (the algorithm `propose(features, params) -> masks`, its
parameters, input policy and backbone-family defaults), plus one `METHODS.register` line below naming it. The
choices of gen_masks.py and pipeline.py (`method_names`) and their --help (`method_summaries`) come from here.

A method takes the backbone features of a batch (`distill.patches.PatchFeatures`) and returns a list of
scored patch masks (`PatchMask`) per image, plus, where the official recipe has one, a pixel-level `refine`
step that the engine runs in its post-processing workers (MaskCut's CRF). The engine (`distill.engine`) owns
batching, precision, the input resize, post-processing, output and resume; a method module owns only its
algorithm. Each method carries the defaults of its official code: its parameters and its input policy.

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

`distill.methods.method_defaults(method, arch)` gives the result; flags given explicitly still win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from utils.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from distill.data import Geometry
    from distill.patches import PatchFeatures, PatchMask

# The choices of the flags every method shares, for --help (the modules that apply them import these).
FOREGROUND_RULES = ("eigenvector", "attention")  # which side of a cut is the object (`--foreground`)
FEATURE_SETTINGS = ("raw", "centred", "centred_tokens")  # what the patch graphs read (`--features`, distill.features)
MASK_SCORES = ("official", "attention")  # how MaskCut ranks its masks (`--mask_score`, distill.maskcut)


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


METHODS = Registry("--method")  # name -> the module:attribute of its `Method`


def method_names() -> tuple[str, ...]:
    return METHODS.names()


def method_summaries() -> str:
    """`name: summary` for every method, for --help."""
    return METHODS.summaries()


def load_method(name: str) -> Method:
    """The `Method` registered as `name` (its module imported now)."""
    method = METHODS.load(name)
    if not isinstance(method, Method) or method.name != name:
        raise TypeError(f"{METHODS.target(name)} is not the Method {name!r}")
    return method


METHODS.register("maskdistill", "distill.maskgen:MASKDISTILL", "one mask from the CLS attention and the key graph")
METHODS.register("lost", "distill.lost:LOST", "one mask grown from the lowest-degree patch")
METHODS.register("tokencut", "distill.tokencut:TOKENCUT", "one mask from a normalized cut")
METHODS.register("maskcut", "distill.maskcut:MASKCUT",
                 "up to --num_objects masks from repeated normalized cuts, refined by a dense CRF")
