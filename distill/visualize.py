"""Drawing masks for people to look at: the transparent layers of the HTML gallery (`utils/gallery.py`),
and `gen_masks.py --vis_dir`'s overlay PNGs and gallery.

For an image with masks (best first) this draws, at the thumbnail size (longer side `MAX_SIDE`, masks
sampled at the pixel centres):
- `fill`: every mask in its own colour (`COLOURS`, by rank), opaque (the page sets the opacity);
- `marks`: its outline and box in the same colour, its rank and score (or GT category) in a tag,
  and the patch that seeded it in yellow.

`--vis_dir DIR` gets, per image, `DIR/<name>.png` (the image with both layers, a standalone overlay)
and in `DIR/gallery/` the thumbnail, the layers and a caption file (`<name>.json`: file name, size,
the source image, each mask's score, box and area), from which `write_gallery` makes `DIR/index.html`
at the end of the run. `<name>` is the image's path relative to the data set root with `/` written
`__` and its extension kept, so `horses/images/001.jpg` -> `horses__images__001.jpg.png` (no two
images of a folder tree collide, whatever their extensions).
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.coco_io import atomic_path, load_json, mask_to_bbox, write_json
from utils.gallery import Column, GalleryImage, MaskCaption, Panel, relative_link, write_gallery as write_page

MAX_SIDE = 480  # thumbnails and layers are downscaled to this longer side
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
SEED_COLOUR = (255, 255, 0)
FILL_ALPHA = 0.55  # the mask colour's weight in the standalone overlay PNG
GALLERY_FOLDER = "gallery"  # thumbnails, layers and captions under --vis_dir
TAG_FONT = ImageFont.load_default(size=12)


def flat_name(file_name: str) -> str:
    """A file name relative to the image root as one readable file name: `a/b/001.jpg` -> `a__b__001.jpg`."""
    return file_name.replace("\\", "/").replace("/", "__")


def overlay_name(file_name: str) -> str:
    """The standalone overlay PNG of an image under --vis_dir."""
    return flat_name(file_name) + ".png"


def colour(rank: int) -> tuple[int, int, int]:
    return COLOURS[rank % len(COLOURS)]


def thumbnail(image: Image.Image) -> tuple[Image.Image, float]:
    """The image downscaled to `MAX_SIDE` (never enlarged) and its scale."""
    scale = min(1.0, MAX_SIDE / max(image.size))
    if scale == 1.0:
        return image, scale
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), scale


# Layers are palette images: index 0 transparent, 1.. the mask colours, then the tags' background and the
# seeds' yellow. They encode 10x faster than RGBA and are a few KiB.
TAG_INDEX = len(COLOURS) + 1
SEED_INDEX = len(COLOURS) + 2
PALETTE = [0, 0, 0, *(v for c in COLOURS for v in c), 0, 0, 0, *SEED_COLOUR]


def _palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette(PALETTE)
    image.info["transparency"] = 0
    return image


def downsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A full-size mask at `size` (width, height), uint8, by nearest sampling at the pixel centres."""
    return cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8), size, interpolation=cv2.INTER_NEAREST_EXACT)


def draw_layers(size: tuple[int, int], scale: float, masks: list[np.ndarray], tags: list[str],
                seeds: list[tuple[float, float, float, float] | None] | None = None) -> tuple[Image.Image, Image.Image]:
    """The `fill` and `marks` layers (palette images with a transparent index, `size` = thumbnail
    (width, height)) of full-size boolean `masks`, best first; `tags` label them (e.g. scores), `seeds`
    are (x0, y0, x1, y1) boxes in original pixels."""
    width, height = size
    fill = np.zeros((height, width), np.uint8)
    marks = np.zeros((height, width), np.uint8)
    corners = []
    for rank in reversed(range(len(masks))):  # the best mask is drawn last, on top
        small = downsample(masks[rank], size) if scale < 1 else masks[rank].astype(np.uint8)
        index = rank % len(COLOURS) + 1
        fill[small > 0] = index
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(marks, contours, -1, index, thickness=2)
        x, y, w, h = (int(v) for v in mask_to_bbox(small))
        if w and h:
            cv2.rectangle(marks, (x, y), (x + w - 1, y + h - 1), index, 1)
        corners.append((rank, x, y))
    for seed in seeds or []:
        if seed is not None:
            x0, y0, x1, y1 = (int(v * scale) for v in seed)
            cv2.rectangle(marks, (x0, y0), (x1, y1), SEED_INDEX, 1)
    marks_image = _palette_image(marks)
    draw = ImageDraw.Draw(marks_image)
    for rank, x, y in corners:
        label = f"{rank + 1}:{tags[rank]}" if rank < len(tags) else str(rank + 1)
        left, top, right, bottom = draw.textbbox((x + 2, y + 2), label, font=TAG_FONT)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=TAG_INDEX)
        draw.text((x + 2, y + 2), label, fill=rank % len(COLOURS) + 1, font=TAG_FONT)
    return _palette_image(fill), marks_image


def composite(base: Image.Image, fill: Image.Image, marks: Image.Image) -> Image.Image:
    """The image with its layers on top (the fill at `FILL_ALPHA`), as RGB."""
    faded = np.asarray(fill.convert("RGBA")).copy()
    faded[..., 3] = (faded[..., 3] * FILL_ALPHA).astype(np.uint8)
    out = Image.alpha_composite(base.convert("RGBA"), Image.fromarray(faded, "RGBA"))
    return Image.alpha_composite(out, marks.convert("RGBA")).convert("RGB")


def save_image(image: Image.Image, path: Path) -> None:
    """PNG or JPEG (by suffix), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            image.convert("RGB").save(tmp, format="JPEG", quality=88)
        else:
            image.save(tmp, format="PNG", compress_level=1)  # 3-4x faster than the default 6, about 10% larger


def gallery_paths(vis_dir: Path, file_name: str) -> dict[str, Path]:
    """Where --vis_dir keeps an image's thumbnail, layers and caption file."""
    stem = vis_dir / GALLERY_FOLDER / flat_name(file_name)
    return {"thumb": Path(f"{stem}.jpg"), "fill": Path(f"{stem}.fill.png"), "marks": Path(f"{stem}.marks.png"),
            "caption": Path(f"{stem}.json")}


def save_overlay(image: Image.Image, masks: list[np.ndarray], scores: list[float],
                 seed_boxes: list[tuple[float, float, float, float] | None], out_path: Path,
                 file_name: str | None = None, source: str | os.PathLike | None = None) -> None:
    """`gen_masks.py --vis_dir`: the overlay PNG `out_path` (each mask, best first, tinted in its colour,
    outlined and boxed, with its rank and score; yellow: the patch that seeded it), and, given the
    image's `file_name` (relative to the data set root) and `source` file, its gallery files."""
    base, scale = thumbnail(image)
    fill, marks = draw_layers(base.size, scale, masks, [f"{s:.2f}" for s in scores], seed_boxes)
    save_image(composite(base, fill, marks), out_path)
    if file_name is None:
        return
    paths = gallery_paths(out_path.parent, file_name)
    save_image(base, paths["thumb"])
    save_image(fill, paths["fill"])
    save_image(marks, paths["marks"])
    caption = {"file_name": file_name, "width": image.width, "height": image.height,
               "source": str(Path(source).resolve()) if source else None,
               "masks": [{"score": float(s), "bbox": mask_to_bbox(m), "area": float(m.sum())}
                         for m, s in zip(masks, scores)]}
    write_json(paths["caption"], caption)


def write_gallery(vis_dir: Path, settings: dict | None = None) -> Path:
    """`vis_dir/index.html` for every image `save_overlay` has drawn there (one column, named by the
    run's method; `settings`, the run's recorded settings, fill its banner)."""
    label = str((settings or {}).get("method") or "masks")
    images = []
    for caption_path in sorted((vis_dir / GALLERY_FOLDER).glob("*.json")):
        caption = load_json(caption_path, "gallery caption")
        paths = {k: p.relative_to(vis_dir).as_posix() for k, p in gallery_paths(vis_dir, caption["file_name"]).items()}
        masks = [MaskCaption(bbox=m["bbox"], area=m["area"], colour=colour(rank), score=m["score"])
                 for rank, m in enumerate(caption["masks"])]
        source = caption.get("source")
        images.append(GalleryImage(
            name=caption["file_name"], width=caption["width"], height=caption["height"], thumb=paths["thumb"],
            full=relative_link(source, vis_dir) if source else None,
            panels={label: Panel(fill=paths["fill"], marks=paths["marks"], masks=masks)}))
    images.sort(key=lambda image: image.name)
    return write_page(vis_dir, images, [Column(label, settings)], title=f"gen_masks: {label} masks")

