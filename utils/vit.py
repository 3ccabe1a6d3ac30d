"""ViT backbones built with timm, loading the official DINO and DINOv2 checkpoints.

`--arch` names a row of `utils.vit_archs.BACKBONES` (the DINO and DINOv2 releases, torch-free).

Position embeddings are resampled exactly as the official `interpolate_pos_encoding` of each
family does (`interpolate_pos_encoding` below); timm's own resampling differs and changes the
masks. Register tokens sit between CLS and the patches inside the network, as in DINOv2, and are
dropped from every output: they are never part of the patch graph.
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
from utils.vit_archs import backbone_spec, resolve_patch_size


class LastBlockQK(NamedTuple):
    """Queries and keys of the last block, shape (B, heads, 1 + N, head_dim): CLS first, then the
    N patches in raster order (register tokens dropped)."""

    query: torch.Tensor
    key: torch.Tensor
    # The final normalised output tokens (DINOv2's `x_norm`), split into the same heads, CLS first,
    # registers dropped; only when `last_qk(..., tokens=True)` asks for them (None otherwise).
    tokens: torch.Tensor | None = None


def interpolate_pos_encoding(pos_embed: torch.Tensor, grid_h: int, grid_w: int, offset: float = 0.1,
                             antialias: bool = False) -> torch.Tensor:
    """The official `interpolate_pos_encoding` of DINO and DINOv2 for a `grid_h x grid_w` patch grid.

    `pos_embed` is (1, 1 + N, D): CLS, then a square sqrt(N) x sqrt(N) grid. The grid is resized
    bicubically (in float32); the CLS embedding is kept. With `offset` > 0 (DINO; DINOv2 without
    registers: 0.1) the resize uses scale factors `(grid + offset) / sqrt(N)`, the offset avoiding
    floating-point error in the output size; with `offset` 0 (DINOv2 with registers) it asks for
    the output size itself. `antialias` only matters when shrinking. An unchanged square grid is
    returned as is.
    """
    num_patches = pos_embed.shape[1] - 1
    if num_patches == grid_h * grid_w and grid_h == grid_w:
        return pos_embed
    side = int(math.sqrt(num_patches))
    dim = pos_embed.shape[-1]
    class_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resize = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
    else:
        resize = {"size": (grid_h, grid_w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)
    assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([class_pos, patch_pos], dim=1)


class DinoViT(nn.Module):
    """A timm VisionTransformer with DINO/DINOv2-style inputs of any size (multiples of the patch size).

    `self.vit.state_dict()` has exactly the keys of the official checkpoint of `arch`.
    """

    def __init__(self, arch: str = "vit_small", patch_size: int | None = None, initialise: bool = True) -> None:
        super().__init__()
        self.spec = backbone_spec(arch)
        self.arch, self.patch_size = arch, resolve_patch_size(arch, patch_size)
        # initialise=False skips timm's weight init (seconds for a ViT-B) when a checkpoint replaces every weight.
        self.vit = timm.create_model(self.spec.timm_name.format(p=self.patch_size), pretrained=False, num_classes=0,
                                     weight_init="" if initialise else "skip", **dict(self.spec.timm_kwargs))
        dim = self.vit.embed_dim
        # The official DINOv2 parameters timm's model lacks (timm keeps registers as `reg_token`
        # with a different position layout): attached under the official names.
        if self.spec.mask_token:
            self.vit.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.num_register_tokens = self.spec.register_tokens
        if self.num_register_tokens:
            self.vit.register_tokens = nn.Parameter(torch.zeros(1, self.num_register_tokens, dim))
        self.num_heads = self.vit.blocks[-1].attn.num_heads
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    # ------------------------------------------------------------------ internals
    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.vit.pos_embed
        offset, antialias = self.spec.interpolate_offset, self.spec.interpolate_antialias
        if torch.is_grad_enabled() and pos.requires_grad:
            return interpolate_pos_encoding(pos, grid_h, grid_w, offset, antialias)
        key = (grid_h, grid_w, pos.device, pos.dtype, pos._version, pos.data_ptr())
        if key not in self._pos_cache:
            if len(self._pos_cache) > 64:
                self._pos_cache.clear()
            self._pos_cache[key] = interpolate_pos_encoding(pos.detach(), grid_h, grid_w, offset, antialias)
        return self._pos_cache[key]

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend CLS, add the (interpolated) position embeddings, then insert the register
        tokens (if any, without position embeddings) after CLS: (B, 1 + R + N, D)."""
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        patches = self.vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.vit.cls_token.expand(b, -1, -1).to(patches.dtype), patches], dim=1)
        tokens = tokens + self._pos_embed(h // self.patch_size, w // self.patch_size).to(tokens.dtype)
        if self.num_register_tokens:
            registers = self.vit.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def without_registers(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Drop the register tokens along `dim` of a (.., 1 + R + N, ..) tensor: CLS, then the patches."""
        if not self.num_register_tokens:
            return tokens
        first_patch = 1 + self.num_register_tokens
        return torch.cat([tokens.narrow(dim, 0, 1), tokens.narrow(dim, first_patch, tokens.shape[dim] - first_patch)],
                         dim=dim)

    # ------------------------------------------------------------------ public API
    def last_qk(self, images: torch.Tensor, tokens: bool = False) -> LastBlockQK:
        """Queries and keys of the last block, CLS first then the patches (no registers). All earlier
        blocks run timm's fused attention (`scaled_dot_product_attention`); the last block is only
        run up to its qkv projection, unless `tokens` asks for the final normalised output tokens too."""
        x = self.prepare_tokens(images)
        for block in self.vit.blocks[:-1]:
            x = block(x)
        last = self.vit.blocks[-1]
        b, n, d = x.shape
        qkv = last.attn.qkv(last.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        qkv = self.without_registers(qkv.permute(2, 0, 3, 1, 4), dim=3)
        if not tokens:
            return LastBlockQK(query=qkv[0], key=qkv[1])
        output = self.without_registers(self.vit.norm(last(x)))
        output = output.reshape(b, output.shape[1], self.num_heads, d // self.num_heads).transpose(1, 2)
        return LastBlockQK(query=qkv[0], key=qkv[1], tokens=output)

    def output_tokens(self, images: torch.Tensor, no_grad_blocks: int = 0) -> torch.Tensor:
        """The final normalised tokens (DINOv2's `x_norm`), (B, 1 + N, D): CLS, then the N patches in
        raster order (registers dropped). The patch embedding and the first `no_grad_blocks` blocks run
        without autograd (a partly frozen backbone); 0 leaves autograd as the caller set it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad_blocks):
            x = self.prepare_tokens(images)
            for block in self.vit.blocks[:no_grad_blocks]:
                x = block(x)
        for block in self.vit.blocks[no_grad_blocks:]:
            x = block(x)
        return self.without_registers(self.vit.norm(x))

    def cls_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final normalised CLS token, (B, D)."""
        return self.output_tokens(images)[:, 0]

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
        state["pos_embed"] = interpolate_pos_encoding(state["pos_embed"].float(), side, side,
                                                      model.spec.interpolate_offset, model.spec.interpolate_antialias)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"weights {source} do not match the {model.spec.family} {model.arch}/{model.patch_size} "
                        f"layout: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                        f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    model.vit.load_state_dict(state, strict=True)


def load_dino_state_dict(arch: str, patch_size: int | None = None) -> dict:
    """The official checkpoint of `arch` (DINO or DINOv2) through `torch.hub` (downloaded once, then cached)."""
    spec, patch_size = backbone_spec(arch), resolve_patch_size(arch, patch_size)
    url = spec.urls[patch_size]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=sys.stderr.isatty())
    except Exception as exc:  # offline: URLError, socket errors, HTTP errors
        raise UserError(f"cannot download the {spec.family} {arch}/{patch_size} weights ({type(exc).__name__}) and "
                        f"no cached copy is at {cached}; download {url} and pass --weights PATH") from None


def build_vit(arch: str = "vit_small", patch_size: int | None = None, weights: str = "dino") -> DinoViT:
    """Factory for every `--arch` (see `utils.vit_archs.BACKBONES`). `patch_size` None takes the arch's default;
    `weights` is `dino` (the arch's official checkpoint via torch.hub: DINO or DINOv2), a local
    path, or `random`."""
    patch_size = resolve_patch_size(arch, patch_size)
    if weights == "random":
        # Seeded, so that `random` weights are the same in every process (shards, resumes, ranks).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DinoViT(arch, patch_size)
        print("WARNING: --weights random: the ViT has RANDOM weights, so its masks and features mean "
              "nothing. Use it for smoke tests only.", file=sys.stderr)
        return model.eval()
    # The checkpoint first: a missing file or download fails before any model is built.
    if weights == "dino":
        state, source = load_dino_state_dict(arch, patch_size), f"{backbone_spec(arch).family} {arch}/{patch_size}"
    else:
        state = read_torch_file(weights, "--weights checkpoint",
                                hint="no such file; use 'dino', 'random' or a checkpoint path")
        source = str(Path(weights))
    model = DinoViT(arch, patch_size, initialise=False)
    load_weights_into(model, state, source)
    return model.eval()
