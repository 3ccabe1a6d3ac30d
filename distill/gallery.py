"""A side-by-side gallery of several masks files (methods, backbones, runs, trained models) over the same
images, with the ground truth as a column when given: `make_gallery.py`, and `build_gallery` for
other commands (e.g. a pipeline report linking the page).

Every masks file is a COCO dataset (e.g. `gen_masks.py` output; its `info.settings` fill the column's
banner) or a COCO results list (then the images come from another file). Images are matched across
files by id, as every evaluator here does (the pipeline's contract), and a file that names an id with
another file name is refused. The GT column shows the GT objects of the GT image of the same file name
(`utils.coco_io.ImagesByName`), whatever its id. Layout of `out_dir`:

    index.html                    the page (utils/gallery.py)
    images/<name>.jpg             thumbnails (longer side 480)
    c1-<label>/<name>.fill.png    each column's layers (distill/visualize.py), c2-..., gt/ for the GT
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from distill.visualize import colour, draw_layers, flat_name, save_image, thumbnail
from utils.coco_io import (annotations_by_image, check_writable_folder, gt_ids_by_file_name, load_coco_dataset,
                           load_predictions, names_all_images, segmentation_to_rle)
from utils.errors import UserError
from utils.gallery import Column, GalleryImage, MaskCaption, Panel, relative_link, write_gallery
from utils.images import ImageReadError, load_rgb, read_size
from utils.lock import folder_lock
from utils.progress import progress


@dataclass
class MasksSource:
    """One column's file: its annotations by image id and its images (None for a results list)."""

    column: Column
    by_image: dict[int, list[dict]]
    images: list[dict] | None
    folder: str  # the column's folder under out_dir

    def lists(self, image_id: int) -> bool:
        """Whether the file covers the image (a results list covers every image)."""
        return self.images is None or image_id in self.image_ids

    def __post_init__(self) -> None:
        self.image_ids = {image["id"] for image in self.images or []}


def default_labels(paths: list[str]) -> list[str]:
    """Column labels from file names: the stem (`maskcut.json` -> `maskcut`), the path where stems repeat."""
    stems = [Path(p).stem for p in paths]
    return [stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths)]


def folder_name(number: int, label: str) -> str:
    return f"c{number}-" + (re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "masks")[:40]


def load_sources(masks: list[str], labels: list[str]) -> list[MasksSource]:
    sources = []
    for number, (path, label) in enumerate(zip(masks, labels), 1):
        annotations, dataset = load_predictions(path)
        settings = ((dataset or {}).get("info") or {}).get("settings")
        images = dataset.get("images") if dataset else None
        sources.append(MasksSource(Column(label, settings if isinstance(settings, dict) else None, source=str(path)),
                                   annotations_by_image(annotations), images, folder_name(number, label)))
    return sources


def image_set(sources: list[MasksSource], gt: dict | None, gt_name: str = "--gt_json") -> tuple[list[dict], dict | None]:
    """The images of the page: every image of the masks files (their union, by id), else the GT images
    that the masks name; ids naming different files in two files are refused. Returns them and, when the
    masks files and the GT name their images, the GT id of each page image (matched by file_name, whatever
    the ids: an image the GT does not have is refused); None when ids are the GT's."""
    chosen: dict[int, tuple[dict, str]] = {}
    named = [(source.images, source.column.source) for source in sources if source.images is not None]
    for images, where in named:
        for image in images:
            chosen.setdefault(image["id"], (image, where))
    gt_ids = None
    if named and gt is not None and names_all_images(gt["images"]):
        gt_ids = {}
        for images, where in named:
            gt_ids.update(gt_ids_by_file_name(images, gt["images"], where, gt_name, "--gt_json") or {})
    if not named:
        if gt is None:
            raise UserError("no image list: give a masks file that is a COCO dataset (with 'images'), or --gt_json")
        wanted = {image_id for source in sources for image_id in source.by_image}
        chosen = {img["id"]: (img, "--gt_json") for img in gt["images"] if img["id"] in wanted}
    gt_images = {img["id"]: img for img in gt["images"]} if gt and not gt_ids else {}
    for images, where in [*named, *([(list(gt_images.values()), "--gt_json")] if gt_images else [])]:
        for image in images:
            first, first_where = chosen.get(image["id"], (image, where))
            if PurePosixPath(first["file_name"]).name != PurePosixPath(image["file_name"]).name:
                raise UserError(f"image id {image['id']} is {first['file_name']} in {first_where} but "
                                f"{image['file_name']} in {where}; the files are of different image sets")
    for source in sources:
        unknown = set(source.by_image) - set(chosen)
        if unknown:
            raise UserError(f"{source.column.source}: {len(unknown)} image id(s) not in any image list, "
                            f"e.g. {min(unknown)}")
    return sorted((image for image, _ in chosen.values()), key=lambda image: image["file_name"]), gt_ids


def _rle(annotation: dict, image: dict) -> dict:
    return segmentation_to_rle(annotation["segmentation"], image["height"], image["width"])


def _best_ious(rles: list[dict], others: list[dict]) -> list[float | None]:
    """Each mask's best IoU with any of `others` (None when there are none)."""
    if not rles or not others:
        return [None] * len(rles)
    return [float(v) for v in np.asarray(mask_utils.iou(rles, others, [0] * len(others))).max(axis=1)]


def _panel(image: dict, annotations: list[dict], base: Image.Image, scale: float, out_dir: Path, folder: str,
           gt_rles: list[dict], first_top: dict | None, is_gt: bool, categories: dict[int, str]) -> tuple[Panel, dict | None]:
    """Draw and save one column's layers for one image; returns the panel and its top mask's RLE."""
    if is_gt:
        ordered = sorted(annotations, key=lambda a: (a.get("iscrowd", 0), a["category_id"], a.get("id", 0)))
        tags = [categories.get(a["category_id"], str(a["category_id"])) for a in ordered]
    else:
        ordered = sorted(annotations, key=lambda a: -float(a.get("score", 1.0)))
        tags = [f"{float(a.get('score', 1.0)):.2f}" for a in ordered]
    rles = [_rle(a, image) for a in ordered]
    masks = [mask_utils.decode(r) for r in rles]  # uint8, 0/1
    fill, marks = draw_layers(base.size, scale, masks, tags)
    stem = f"{folder}/{flat_name(image['file_name'])}"
    save_image(fill, out_dir / f"{stem}.fill.png")
    save_image(marks, out_dir / f"{stem}.marks.png")
    gt_ious = [None] * len(rles) if is_gt else _best_ious(rles, gt_rles)
    captions = []
    for rank, (annotation, mask, iou) in enumerate(zip(ordered, masks, gt_ious)):
        bbox = annotation.get("bbox") or [float(v) for v in mask_utils.toBbox(rles[rank])]
        area = float(annotation["area"]) if annotation.get("area") is not None else float(mask.sum())
        captions.append(MaskCaption(bbox=list(bbox), area=area, colour=colour(rank), gt_iou=iou,
                                    score=None if is_gt else float(annotation.get("score", 1.0)),
                                    category=tags[rank] if is_gt else None, crowd=bool(annotation.get("iscrowd", 0))))
    top = rles[0] if rles else None
    agreement = None
    if not is_gt and first_top is not None and top is not None:
        agreement = float(np.asarray(mask_utils.iou([top], [first_top], [0]))[0, 0])
    return Panel(fill=f"{stem}.fill.png", marks=f"{stem}.marks.png", masks=captions, agreement=agreement), top


def build_gallery(out_dir: str | os.PathLike, image_root: str | os.PathLike, masks: list[str],
                  labels: list[str] | None = None, gt_json: str | None = None, title: str | None = None,
                  max_images: int = 0, page_size: int = 24, overwrite: bool = False) -> Path:
    """Draw every image of the `masks` files (COCO datasets or results lists; `file_name`s relative to
    `image_root`) under one column each, the GT of `gt_json` first when given, into `out_dir`, and
    write `out_dir/index.html` (returned). `max_images` keeps the first N by file name (0: all).
    Everything is checked before anything is written; every file is written atomically."""
    out_dir, image_root = Path(out_dir), Path(image_root)
    if not masks:
        raise UserError("give at least one masks file")
    labels = labels or default_labels(masks)
    if len(labels) != len(masks):
        raise UserError(f"{len(labels)} label(s) for {len(masks)} masks file(s); give one label per file")
    if len(set(labels)) != len(labels) or "GT" in labels:
        raise UserError(f"labels must be distinct and not 'GT': {labels}")
    if not image_root.is_dir():
        raise UserError(f"image root {image_root} is not a folder")
    if (out_dir / "index.html").exists() and not overwrite:
        raise UserError(f"output {out_dir / 'index.html'} already exists; pass --overwrite to replace it")
    check_writable_folder(out_dir)
    sources = load_sources(masks, labels)
    gt = load_coco_dataset(gt_json) if gt_json else None
    images, gt_ids = image_set(sources, gt, str(gt_json))
    if max_images:
        images = images[:max_images]
    missing = [image["file_name"] for image in images if not (image_root / image["file_name"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) not found under {image_root}, e.g. {missing[0]}")
    for image in images:  # header reads only: the masks must be drawn on the image they were made for
        path = image_root / image["file_name"]
        try:
            size = read_size(path)
        except ImageReadError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        if size != (image["height"], image["width"]):
            raise UserError(f"image {path} is {size[1]}x{size[0]}, but its masks are for "
                            f"{image['width']}x{image['height']}")

    with folder_lock(out_dir, "--out"):  # a second gallery into the same --out is refused
        if (out_dir / "index.html").exists() and not overwrite:  # again: another run may have finished meanwhile
            raise UserError(f"output {out_dir / 'index.html'} already exists; pass --overwrite to replace it")
        return _draw(out_dir, image_root, images, gt_ids, sources, labels, gt, gt_json, title, page_size)


def _draw(out_dir: Path, image_root: Path, images: list[dict], gt_ids: dict | None, sources: list[MasksSource],
          labels: list[str], gt: dict | None, gt_json: str | None, title: str | None, page_size: int) -> Path:
    """Write the thumbnails, every column's layers and the page (build_gallery, once everything is checked)."""
    gt_by_image = annotations_by_image(gt["annotations"]) if gt else {}
    categories = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]} if gt else {}
    columns = ([Column("GT", source=str(gt_json), kind="gt")] if gt else []) + [s.column for s in sources]
    rows = []
    for image in progress(images, desc="gallery", unit="img"):
        path = image_root / image["file_name"]
        try:
            original = load_rgb(path)
        except ImageReadError as exc:  # a header that reads, with broken data after it
            raise UserError(f"cannot read image {path}: {exc}") from None
        base, scale = thumbnail(original)
        thumb = f"images/{flat_name(image['file_name'])}.jpg"
        save_image(base, out_dir / thumb)
        panels = {}
        gt_rles = []
        if gt:
            gt_annotations = gt_by_image.get(gt_ids[image["id"]] if gt_ids else image["id"], [])
            panels["GT"], _ = _panel(image, gt_annotations, base, scale, out_dir, "gt", [], None, True, categories)
            gt_rles = [_rle(a, image) for a in gt_annotations if not a.get("iscrowd", 0)]
        first_top = None
        for number, source in enumerate(sources):
            annotations = source.by_image.get(image["id"], [])
            if not source.lists(image["id"]):
                continue
            panels[source.column.label], top = _panel(image, annotations, base, scale, out_dir, source.folder,
                                                      gt_rles, first_top, False, categories)
            if number == 0:
                first_top = top
        rows.append(GalleryImage(image["file_name"], image["width"], image["height"], thumb,
                                 relative_link(path, out_dir), panels))
    title = title or "Masks: " + " vs ".join(labels)
    return write_gallery(out_dir, rows, columns, title=title, page_size=page_size)
