"""The literal, unoptimised formulation of the mask discovery, one image at a time.

It computes explicit attention (softmax(q kᵀ / sqrt(d)) v) in every block and materialises the
N x N patch graph G_i, exactly as the paper describes. `distill.maskgen` must agree with it;
tests and `benchmarks/bench_gen_masks.py` use it as the reference and the speed baseline.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from utils.vit import DinoViT, LastBlockQK


def explicit_last_qk(model: DinoViT, image: torch.Tensor) -> LastBlockQK:
    """Queries and keys of the last block (CLS, patches), with every block's attention matrix materialised."""
    x = model.prepare_tokens(image)
    blocks = model.vit.blocks
    for i, block in enumerate(blocks):
        b, n, d = x.shape
        heads = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if i == len(blocks) - 1:
            return LastBlockQK(model.without_registers(q, dim=2), model.without_registers(k, dim=2))
        attention = (q @ k.transpose(-2, -1) * block.attn.scale).softmax(dim=-1)
        x = x + block.ls1(block.attn.proj((attention @ v).transpose(1, 2).reshape(b, n, d)))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    raise AssertionError("unreachable")


def literal_mask(query: np.ndarray, key: np.ndarray, grid_h: int, grid_w: int, heads: int = 5,
                 topk: float = 0.4, mass: float = 0.5) -> np.ndarray:
    """The paper's steps for one image. query/key: (num_heads, 1 + N, d). Returns a (grid_h, grid_w) mask."""
    query, key = query.astype(np.float64), key.astype(np.float64)
    g_cls = np.mean([query[h, 0] @ key[h, 1:].T for h in range(heads)], axis=0)
    order = np.argsort(g_cls, kind="stable")
    cumulative = np.cumsum(g_cls[order] / g_cls.sum())
    g_cls = g_cls.copy()
    g_cls[order[cumulative <= 1 - mass]] = 0
    g_i = sum(key[h, 1:] @ key[h, 1:].T for h in range(key.shape[0]))  # N x N
    top = np.argsort(-g_cls, kind="stable")[: max(1, int(topk * g_cls.size))]
    seed = top[0]
    sources = [s for s in top if g_i[seed, s] > 0]
    foreground = (g_i[sources].sum(axis=0) > 0).reshape(grid_h, grid_w)
    labels, _ = ndimage.label(foreground)
    seed_rc = divmod(int(seed), grid_w)
    if labels[seed_rc] == 0:
        mask = np.zeros((grid_h, grid_w), dtype=bool)
        mask[seed_rc] = True
        return mask
    return labels == labels[seed_rc]
