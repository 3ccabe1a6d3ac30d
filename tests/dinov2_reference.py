"""The official DINOv2 definitions, written out independently of utils/vit.py, for the tests:
the checkpoint key layout, `interpolate_pos_encoding` and the forward pass (explicit attention)."""
import math

import torch
import torch.nn.functional as F


def official_layout_state(registers: int, dim: int = 32, depth: int = 2, grid: int = 5, seed: int = 0) -> dict:
    """A checkpoint written key by key in the layout of the official `dinov2_*_pretrain.pth` files."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, 1 + grid * grid, dim), "mask_token": torch.zeros(1, dim),
             "patch_embed.proj.weight": rand(dim, 3, 14, 14, scale=0.02), "patch_embed.proj.bias": rand(dim),
             "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}
    if registers:
        state["register_tokens"] = rand(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + rand(dim), b + "norm1.bias": rand(dim),
                      b + "attn.qkv.weight": rand(3 * dim, dim), b + "attn.qkv.bias": rand(3 * dim),
                      b + "attn.proj.weight": rand(dim, dim), b + "attn.proj.bias": rand(dim),
                      b + "ls1.gamma": rand(dim, scale=0.5), b + "norm2.weight": 1 + rand(dim), b + "norm2.bias": rand(dim),
                      b + "mlp.fc1.weight": rand(4 * dim, dim), b + "mlp.fc1.bias": rand(4 * dim),
                      b + "mlp.fc2.weight": rand(dim, 4 * dim), b + "mlp.fc2.bias": rand(dim),
                      b + "ls2.gamma": rand(dim, scale=0.5)})
    return state


def official_interpolation(pos_embed, x_shape, patch_size, offset, antialias):
    """DINOv2's `DinoVisionTransformer.interpolate_pos_encoding`, written out from its definition
    (its `w, h` are the input's dims 2 and 3): float32 bicubic resize of the sqrt(N) x sqrt(N) grid,
    by scale factors `(dim // p + offset) / sqrt(N)` when offset is set, else to the size itself."""
    _, _, w, h = x_shape
    npatch, n = (w // patch_size) * (h // patch_size), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    m, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    kwargs = {"scale_factor": ((w0 + offset) / m, (h0 + offset) / m)} if offset else {"size": (w0, h0)}
    grid = F.interpolate(pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **kwargs)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1).to(pos_embed.dtype)


def official_forward(state: dict, images: torch.Tensor, num_heads: int, offset: float, antialias: bool):
    """The official DINOv2 forward, from its definition, with explicit attention: returns the last
    block's (query, key) over all tokens (CLS, registers, patches) and the final normalised tokens."""
    b = images.shape[0]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    x = torch.cat([state["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + official_interpolation(state["pos_embed"], images.shape, 14, offset, antialias)
    if "register_tokens" in state:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    dim = x.shape[-1]
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (dim,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, -1, 3, num_heads, dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if i == depth - 1:
            last_qk = (q, k)
        attention = (q @ k.transpose(-2, -1) * (dim // num_heads) ** -0.5).softmax(dim=-1)
        out = F.linear((attention @ v).transpose(1, 2).reshape(b, -1, dim), p["attn.proj.weight"], p["attn.proj.bias"])
        x = x + p["ls1.gamma"] * out
        h = F.layer_norm(x, (dim,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        x = x + p["ls2.gamma"] * h
    return last_qk, F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)
