"""Overlay PNGs (mask, seed patch, box) and an `index.html` gallery for `gen_masks.py --vis_dir`."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from distill.maskgen import PatchMask
from utils.coco_io import atomic_path, mask_to_bbox, write_text

MAX_SIDE = 480  # gallery images are downscaled to this longer side


def overlay_name(file_name: str) -> str:
    return file_name.replace("/", "__").rsplit(".", 1)[0] + ".png"


def save_overlay(image: torch.Tensor, proposal: PatchMask, resized: tuple[int, int], patch_size: int,
                 file_name: str, vis_dir: Path, mean: tuple, std: tuple) -> None:
    """Draw the mask (red tint), the seed patch (yellow square) and the mask's box (green) on the
    resized image (`image` is the normalised, padded network input)."""
    h, w = resized
    rgb = image[:, :h, :w].float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    rgb = (rgb.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    mask = np.kron(proposal.mask, np.ones((patch_size, patch_size), dtype=bool))[:h, :w]
    tinted = rgb.copy()
    tinted[mask] = (0.5 * rgb[mask] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
    canvas = Image.fromarray(tinted)
    draw = ImageDraw.Draw(canvas)
    x, y, bw, bh = mask_to_bbox(mask)
    draw.rectangle([x, y, x + bw - 1, y + bh - 1], outline=(0, 255, 0), width=3)
    row, col = proposal.seed_patch
    draw.rectangle([col * patch_size, row * patch_size, (col + 1) * patch_size - 1, (row + 1) * patch_size - 1],
                   outline=(255, 255, 0), width=2)
    scale = MAX_SIDE / max(h, w)
    if scale < 1:
        canvas = canvas.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    vis_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(vis_dir / overlay_name(file_name)) as tmp:
        canvas.save(tmp, format="PNG")


def write_gallery(vis_dir: Path) -> None:
    """An `index.html` listing every overlay in `vis_dir`."""
    cards = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" loading="lazy"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in sorted(vis_dir.glob("*.png")))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gen_masks overlays</title>
<style>body{{font-family:sans-serif}} figure{{display:inline-block;margin:6px}} img{{max-width:320px}}
figcaption{{font-size:12px}}</style></head><body>
<p>Red: mask. Yellow: seed patch. Green: the mask's box.</p>
{cards}
</body></html>
"""
    write_text(vis_dir / "index.html", page)
