"""Overlay PNGs (every mask of an image, coloured, with its score, box and seed) and an `index.html`
gallery for `gen_masks.py --vis_dir`."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.coco_io import atomic_path, mask_to_bbox, write_text

MAX_SIDE = 480  # gallery images are downscaled to this longer side
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def overlay_name(file_name: str) -> str:
    return file_name.replace("/", "__").rsplit(".", 1)[0] + ".png"


def save_overlay(image: Image.Image, masks: list[np.ndarray], scores: list[float],
                 seed_boxes: list[tuple[float, float, float, float] | None], out_path: Path) -> None:
    """Draw each mask (tinted in its own colour), its box and seed patch (outlined in that colour) and
    its score on the original RGB image; written downscaled to `MAX_SIDE`."""
    rgb = np.asarray(image, dtype=np.float32)
    tinted = rgb.copy()
    for i, mask in enumerate(masks):
        tinted[mask] = 0.45 * tinted[mask] + 0.55 * np.array(COLOURS[i % len(COLOURS)], dtype=np.float32)
    canvas = Image.fromarray(tinted.astype(np.uint8))
    scale = min(1.0, MAX_SIDE / max(canvas.size))
    if scale < 1:
        canvas = canvas.resize((max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))),
                               Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for i, (mask, score, seed) in enumerate(zip(masks, scores, seed_boxes)):
        colour = COLOURS[i % len(COLOURS)]
        x, y, w, h = (v * scale for v in mask_to_bbox(mask))
        if w and h:
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
        if seed is not None:
            draw.rectangle([v * scale for v in seed], outline=(255, 255, 0), width=1)
        label = f"{score:.2f}"
        left, top, right, bottom = draw.textbbox((x + 2, y + 2), label)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        draw.text((x + 2, y + 2), label, fill=colour)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")


def write_gallery(vis_dir: Path) -> None:
    """An `index.html` listing every overlay in `vis_dir`."""
    cards = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" loading="lazy"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in sorted(vis_dir.glob("*.png")))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gen_masks overlays</title>
<style>body{{font-family:sans-serif}} figure{{display:inline-block;margin:6px}} img{{max-width:320px}}
figcaption{{font-size:12px}}</style></head><body>
<p>Each mask of an image in its own colour, with its box and score (0-1, higher ranks first);
yellow: the patch that seeded it.</p>
{cards}
</body></html>
"""
    write_text(vis_dir / "index.html", page)
