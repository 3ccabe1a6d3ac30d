"""What every discovery method takes and returns: backbone features of a batch, scored patch masks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass
class PatchMask:
    """One object on the patch grid."""

    mask: np.ndarray  # (grid_h, grid_w) bool
    score: float  # in [0, 1]; ranks masks within and across images (each method documents its own)
    seed_patch: tuple[int, int] | None = None  # (row, col) of the patch that grew the mask
    seed_in_background: bool = False  # the seed's own score was not positive: the mask is the seed alone


@dataclass
class PatchFeatures:
    """The last block's queries and keys of a batch, (B, heads, 1 + N, head_dim), CLS first, then the
    N = grid_h * grid_w patches in raster order, as `distill.features.discovery_features` gives them:
    raw `query`/`key` for CLS attention, and `graph_key` (raw keys, centred keys or centred output
    tokens, per backbone) for the patch graphs of every method."""

    query: torch.Tensor
    key: torch.Tensor
    grid: tuple[int, int]
    graph_key: torch.Tensor | None = None  # None: the raw keys

    def __post_init__(self) -> None:
        if self.graph_key is None:
            self.graph_key = self.key
        tokens = self.key.shape[2]
        if tokens != self.grid[0] * self.grid[1] + 1:
            raise ValueError(f"{tokens} tokens do not match a {self.grid[0]}x{self.grid[1]} grid plus CLS")

    @property
    def patch_keys(self) -> torch.Tensor:
        """(B, N, heads * head_dim) float32: the graph keys of all heads concatenated, as LOST,
        TokenCut and MaskCut read them from DINO's qkv output (`k.transpose(1, 2).reshape(B, T, -1)`)."""
        batch, heads, tokens, dim = self.graph_key.shape
        return self.graph_key[:, :, 1:].float().permute(0, 2, 1, 3).reshape(batch, tokens - 1, heads * dim)


def seed_component(foreground: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of `foreground` (grid_h, grid_w) that holds `seed` (empty if the seed
    is background), as `scipy.ndimage.label` labels it in the official LOST/TokenCut/MaskCut code."""
    labels, _ = ndimage.label(foreground)
    component = labels[seed]
    return labels == component if component else np.zeros_like(foreground, dtype=bool)
