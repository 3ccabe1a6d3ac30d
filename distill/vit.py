"""DINO ViT backbones built with timm, loading the official DINO checkpoints.

The official checkpoints use timm's key layout (`cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, no head), so the
state dict loads strictly into `timm.create_model(...)`.

Position embeddings are resampled exactly as DINO's `interpolate_pos_encoding` does (bicubic,
scale factors `(n + 0.1) / sqrt(N)`); timm's own resampling differs and changes the masks.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint import read_torch_file
from utils.errors import UserError
from utils.state_dicts import unwrap_state_dict

ARCHS = {"vit_small": "vit_small_patch{p}_224", "vit_base": "vit_base_patch{p}_224"}
PATCH_SIZES = (8, 16)

# Official DINO releases (facebookresearch/dino, README "Pretrained models").
DINO_URLS = {
    ("vit_small", 16): "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_small", 8): "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_base", 16): "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    ("vit_base", 8): "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
}


class LastBlockQK(NamedTuple):
    """Queries and keys of the last block, shape (B, heads, 1 + N, head_dim), CLS first."""

    query: torch.Tensor
    key: torch.Tensor


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding` for a `grid_h x grid_w` patch grid.

    `pos_embed` is (1, 1 + N, D) with N = sqrt(N)^2 square-grid patch embeddings. The patch part
    is resized bicubically with scale factors `((grid_h + 0.1) / sqrt(N), (grid_w + 0.1) / sqrt(N))`;
    the 0.1 avoids floating-point error in the output size (DINO, vision_transformer.py).
    """
    num_patches = pos_embed.shape[1] - 1
    if num_patches == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(num_patches))
    dim = pos_embed.shape[-1]
    class_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(
        patch_pos.float(),
        scale_factor=((grid_h + 0.1) / math.sqrt(num_patches), (grid_w + 0.1) / math.sqrt(num_patches)),
        mode="bicubic",
    ).to(pos_embed.dtype)
    assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([class_pos, patch_pos], dim=1)


class DinoViT(nn.Module):
    """A timm VisionTransformer with DINO-style inputs of any size (multiples of the patch size)."""

    def __init__(self, arch: str = "vit_small", patch_size: int = 16) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown --arch {arch!r}; choose one of {sorted(ARCHS)}")
        if patch_size not in PATCH_SIZES:
            raise UserError(f"unknown --patch_size {patch_size}; choose one of {PATCH_SIZES}")
        self.arch, self.patch_size = arch, patch_size
        self.vit = timm.create_model(ARCHS[arch].format(p=patch_size), pretrained=False, num_classes=0)
        self.num_heads = self.vit.blocks[-1].attn.num_heads
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ internals
    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.vit.pos_embed
        if torch.is_grad_enabled() and pos.requires_grad:
            return interpolate_pos_encoding(pos, grid_h, grid_w)
        key = (grid_h, grid_w, pos.device, pos.dtype, pos._version, pos.data_ptr())
        if key not in self._pos_cache:
            if len(self._pos_cache) > 64:
                self._pos_cache.clear()
            self._pos_cache[key] = interpolate_pos_encoding(pos.detach(), grid_h, grid_w)
        return self._pos_cache[key]

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS and add the (interpolated) position embeddings: (B, 1 + N, D)."""
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        patches = self.vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.vit.cls_token.expand(b, -1, -1).to(patches.dtype), patches], dim=1)
        return tokens + self._pos_embed(h // self.patch_size, w // self.patch_size).to(tokens.dtype)

    # ------------------------------------------------------------------ public API
    def last_qk(self, images: torch.Tensor) -> LastBlockQK:
        """Queries and keys of the last block. All earlier blocks run timm's fused attention
        (`scaled_dot_product_attention`); the last block is only run up to its qkv projection."""
        x = self.prepare_tokens(images)
        for block in self.vit.blocks[:-1]:
            x = block(x)
        last = self.vit.blocks[-1]
        b, n, d = x.shape
        qkv = last.attn.qkv(last.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        return LastBlockQK(query=qkv[0], key=qkv[1])

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final normalised CLS token, (B, D)."""
        x = self.prepare_tokens(images)
        for block in self.vit.blocks:
            x = block(x)
        return self.vit.norm(x)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.cls_features(images)


# ---------------------------------------------------------------------------- weights


def load_weights_into(model: DinoViT, state: dict, source: str) -> None:
    state = unwrap_state_dict(state)  # bare DINO checkpoints and full training ones (teacher, module., backbone.)
    expected = model.vit.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape[-1] != expected["pos_embed"].shape[-1]:
        raise UserError(f"weights {source} have embedding size {state['pos_embed'].shape[-1]}, but "
                        f"--arch {model.arch} needs {expected['pos_embed'].shape[-1]}")
    if "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].shape != expected["patch_embed.proj.weight"].shape:
        raise UserError(f"weights {source} have patch size {state['patch_embed.proj.weight'].shape[-1]}, "
                        f"but --patch_size is {model.patch_size}")
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        # Checkpoint trained at another resolution: keep its embeddings on its own square grid.
        side = int(math.sqrt(expected["pos_embed"].shape[1] - 1))
        state["pos_embed"] = interpolate_pos_encoding(state["pos_embed"].float(), side, side)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"weights {source} do not match the DINO {model.arch}/{model.patch_size} layout: "
                        f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                        f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    model.vit.load_state_dict(state, strict=True)


def load_dino_state_dict(arch: str, patch_size: int) -> dict:
    """The official DINO checkpoint through `torch.hub` (downloaded once, then cached)."""
    url = DINO_URLS[(arch, patch_size)]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=sys.stderr.isatty())
    except Exception as exc:  # offline: URLError, socket errors, HTTP errors
        raise UserError(f"cannot download the DINO {arch}/{patch_size} weights ({type(exc).__name__}) and "
                        f"no cached copy is at {cached}; download {url} and pass --weights PATH") from None


def build_vit(arch: str = "vit_small", patch_size: int = 16, weights: str = "dino") -> DinoViT:
    """Factory: `weights` is `dino` (official checkpoint via torch.hub), a local path, or `random`."""
    # Seeded, so that `random` weights are the same in every process (shards, resumes, ranks).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DinoViT(arch, patch_size)
    if weights == "random":
        print("WARNING: --weights random: the ViT has RANDOM weights, so its masks and features mean "
              "nothing. Use it for smoke tests only.", file=sys.stderr)
    elif weights == "dino":
        load_weights_into(model, load_dino_state_dict(arch, patch_size), f"dino {arch}/{patch_size}")
    else:
        state = read_torch_file(weights, "--weights checkpoint",
                                hint="no such file; use 'dino', 'random' or a checkpoint path")
        load_weights_into(model, state, str(Path(weights)))
    return model.eval()
