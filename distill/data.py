"""Image sets for mask generation (VOC, COCO20k, any folder), input policies (resize, pad), the dataset,
size-grouped batching, and the mapping of patch masks back to pixels."""
from __future__ import annotations

import fnmatch
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from utils.coco_io import OBJECT_CATEGORY, find_by_file_name, load_coco_dataset, read_text_lines
from utils.errors import UserError, print_safely
from utils.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, list_images, load_rgb
from utils.voc import read_image_set, voc_image_id  # the image-id convention of convert_voc.py


@dataclass
class ImageEntry:
    index: int  # position in the dataset's order; fixes image order and annotation ids
    image_id: int
    file_name: str  # relative to the dataset root
    path: Path


# ----------------------------------------------------------------------------- image sets


def voc_entries(root: Path, year: str, image_set: str, split_folder: str = "Segmentation") -> list[ImageEntry]:
    """Images of `VOC{year}/ImageSets/{split_folder}/{image_set}.txt`; file names relative to VOCdevkit."""
    voc = root / f"VOC{year}"
    if not voc.is_dir():
        raise UserError(f"--dataset_root {root} has no VOC{year}/ folder (expected a VOCdevkit directory)")
    stems = read_image_set(voc, split_folder, image_set)
    return [ImageEntry(i, voc_image_id(s), f"VOC{year}/JPEGImages/{s}.jpg", voc / "JPEGImages" / f"{s}.jpg")
            for i, s in enumerate(stems)]


def coco20k_entries(root: Path, coco_json: Path, file_list: Path) -> tuple[list[ImageEntry], dict]:
    """The COCO20k subset (the LOST file list) of a COCO instances JSON, and that subset's GT."""
    dataset = load_coco_dataset(coco_json)
    wanted = read_text_lines(file_list, "COCO20k file list")
    by_name = {Path(img["file_name"]).name: img for img in dataset["images"]}
    entries, images = [], []
    for i, name in enumerate(wanted):
        img = by_name.get(Path(name).name)
        if img is None:
            raise UserError(f"{file_list}: {name!r} is not an image of {coco_json}")
        rel = name if (root / name).is_file() else img["file_name"]
        entries.append(ImageEntry(i, int(img["id"]), rel, root / rel))
        images.append(img)
    ids = {img["id"] for img in images}
    subset = {
        "images": images,
        "annotations": [a for a in dataset["annotations"] if a["image_id"] in ids],
        "categories": dataset["categories"],
    }
    return entries, subset


def class_agnostic(dataset: dict) -> dict:
    """The same dataset with every annotation in one `object` category."""
    return {
        **dataset,
        "annotations": [{**a, "category_id": OBJECT_CATEGORY["id"]} for a in dataset["annotations"]],
        "categories": [dict(OBJECT_CATEGORY)],
    }


# Folder names that hold label images, not photos (VOC's SegmentationClass, CityScapes' gtFine, ...).
LABEL_FOLDER_WORDS = ("mask", "label", "annot", "segmentation", "gt", "ground", "trimap")


def folder_entries(root: Path, image_ids: str = "auto", exclude: Iterable[str] = (),
                   skip_images_not_in_gt: bool = False) -> list[ImageEntry]:
    """Every image under `root`, recursively, less those matching an `exclude` glob. Ids: `from:GT.json` takes
    them from a COCO file by file name (`gt_image_ids`); otherwise the file stems when all are distinct integers
    (COCO's `000000397133.jpg` -> 397133, so outputs line up with COCO GT) under `auto`, else 1..N.
    Warns when the folder seems to mix photos with label masks (`label_like_files`)."""
    files = [f for f in list_images(root) if not is_excluded(f, exclude)]
    if not files:
        excluded = f" (less those matching --exclude {' '.join(exclude)})" if exclude else ""
        raise UserError(f"no images found under {root}{excluded}")
    warn_label_like(root, files)
    if image_ids.startswith("from:"):
        ids = gt_image_ids(files, Path(image_ids[len("from:"):]), root, skip_images_not_in_gt)
        kept = [(f, i) for f, i in zip(files, ids) if i is not None]
        return [ImageEntry(n, image_id, f, root / f) for n, (f, image_id) in enumerate(kept)]
    stems = [Path(f).stem for f in files]
    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    if image_ids == "filename" and not numeric:
        raise UserError("--image_ids filename needs distinct integer file names")
    use_stems = image_ids == "filename" or (image_ids == "auto" and numeric)
    return [ImageEntry(i, int(s) if use_stems else i + 1, f, root / f) for i, (f, s) in enumerate(zip(files, stems))]


def is_excluded(relative: str, patterns: Iterable[str]) -> bool:
    """Whether a path relative to the folder, or one of its parent folders, matches a glob (`masks`, `masks/*`
    and `*/masks` leave out a folder of masks; `*.png` every PNG)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns for prefix in prefixes)


def _is_label_png(path: Path) -> bool:
    """A PNG that stores one value per pixel (palette, grayscale or 1-bit): how label masks are saved."""
    if path.suffix.lower() != ".png":
        return False
    try:
        with Image.open(path) as img:  # the header only
            return img.mode in ("P", "L", "1", "I", "I;16")
    except OSError:
        return False


def label_like_files(root: Path, files: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(single-channel PNGs in a folder named like masks/labels/annotations, pairs of files of one stem in two
    folders): signs that ground-truth masks sit among the photos."""
    in_label_folder = [f for f in files if any(token.startswith(LABEL_FOLDER_WORDS) for part in f.split("/")[:-1]
                                               for token in re.split(r"[^a-z]+", part.lower()))]
    label_pngs = [f for f in in_label_folder if _is_label_png(root / f)]
    first_by_stem: dict[str, str] = {}
    twins = []
    for f in files:
        stem, folder = Path(f).stem, str(Path(f).parent)
        other = first_by_stem.setdefault(stem, f)
        if other != f and str(Path(other).parent) != folder:
            twins.append((other, f))
    return label_pngs, twins


def warn_label_like(root: Path, files: list[str]) -> None:
    """One `warning:` line when the folder seems to mix photos with label masks (--exclude leaves them out)."""
    label_pngs, twins = label_like_files(root, files)
    if not label_pngs and not twins:
        return
    signs = []
    if label_pngs:
        signs.append(f"{len(label_pngs)} single-channel PNG(s) in label-like folders, e.g. {label_pngs[0]}")
    if twins:
        signs.append(f"{len(twins)} name(s) in two folders, e.g. {twins[0][0]} and {twins[0][1]}")
    suspect = label_pngs[0] if label_pngs else twins[0][1]
    folder = suspect.split("/")[0] if "/" in suspect else "*.png"
    print_safely(f"warning: {root} may mix photos with label masks ({'; '.join(signs)}); every image found is "
                 f"processed: pass --exclude '{folder}' to leave them out", sys.stderr)


def gt_image_ids(files: list[str], gt_path: Path, root: Path, skip_missing: bool) -> list[int | str | None]:
    """The id of each file (relative to `root`) in the COCO file `gt_path`, matched by `file_name`: the same
    relative path, else the same base name when only one GT image has it. A file not in the GT is an error
    naming a few, unless `skip_missing` (its id is then None)."""
    found = find_by_file_name(files, load_coco_dataset(gt_path)["images"], str(gt_path),
                              "; pass --exclude to leave one out")
    ids: list[int | str | None] = [None if img is None else img["id"] for img in found]
    missing = [f for f, img in zip(files, found) if img is None]
    if missing and not skip_missing:
        examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{len(missing)} of {len(files)} images under {root} are not in {gt_path} by file_name "
                        f"({examples}); pass --skip_images_not_in_gt to leave them out, or --exclude GLOB")
    if len(missing) == len(files):
        raise UserError(f"no image under {root} is in {gt_path} by file_name")
    return ids


# ----------------------------------------------------------------------------- sizes


def resized_size(height: int, width: int, resize: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision `Resize(resize, max_size=max_size)` on a PIL image.

    `resize=0` keeps the original size (still capped by `max_size`)."""
    short, long = (width, height) if width <= height else (height, width)
    if resize > 0:
        new_short, new_long = resize, int(resize * long / short)
    else:
        new_short, new_long = short, long
    if max_size and new_long > max_size:
        new_short, new_long = max(1, int(max_size * new_short / new_long)), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def padded_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    return math.ceil(height / patch_size) * patch_size, math.ceil(width / patch_size) * patch_size


@dataclass(frozen=True)
class Geometry:
    """The sizes of one image on its way to the network and back. (h, w) pairs."""

    original: tuple[int, int]  # as decoded (after EXIF rotation); masks are written at this size
    working: tuple[int, int]  # after the method's resize; masks are refined (CRF) at this size
    network: tuple[int, int]  # the network input, a multiple of the patch size
    patch_size: int
    stretched: bool  # the network input is the working image resized (CutLER), else zero-padded

    @property
    def grid(self) -> tuple[int, int]:
        return self.network[0] // self.patch_size, self.network[1] // self.patch_size

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of patch (row, col) in original-image pixels."""
        (h, w), (height, width), p = self.working, self.original, self.patch_size
        # network -> working pixels (a resize when stretched, the same pixels when padded) -> original
        scale_y = (h / self.network[0] if self.stretched else 1.0) * height / h
        scale_x = (w / self.network[1] if self.stretched else 1.0) * width / w
        return (col * p * scale_x, row * p * scale_y, min(width, (col + 1) * p * scale_x),
                min(height, (row + 1) * p * scale_y))


@dataclass(frozen=True)
class InputPolicy:
    """How an image becomes the network input; each method has its official one (`distill.methods`).

    * `fixed_size` > 0 (MaskCut): a square `fixed_size` x `fixed_size` LANCZOS resize, then a LANCZOS
      resize to the nearest multiple of the patch size per side (CutLER's `maskcut` and `resize_pil`).
    * otherwise the shorter side goes to `resize` (0 keeps the size) with the longer side capped at
      `max_size` (torchvision `Resize`, bilinear, antialiased), and the image is zero-padded at the
      bottom and right to a multiple of the patch size (MaskDistill, LOST, TokenCut).
    """

    resize: int
    max_size: int
    fixed_size: int
    patch_size: int

    def geometry(self, height: int, width: int) -> Geometry:
        if self.fixed_size:
            side = int(round(self.fixed_size / self.patch_size)) * self.patch_size
            return Geometry((height, width), (self.fixed_size, self.fixed_size), (side, side), self.patch_size, True)
        working = resized_size(height, width, self.resize, self.max_size)
        return Geometry((height, width), working, padded_size(*working, self.patch_size), self.patch_size, False)


def torch_nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output index of `F.interpolate(mode="nearest")` along one axis:
    floor(i * (in / out)) in float32, exactly as torch computes it (CutLER upsamples masks so)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def working_to_patch(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols): the patch-grid row of each working-image row and the column of each column."""
    (h, w), (grid_h, grid_w) = geometry.working, geometry.grid
    if geometry.stretched:
        return torch_nearest_index(h, grid_h), torch_nearest_index(w, grid_w)
    return np.arange(h) // geometry.patch_size, np.arange(w) // geometry.patch_size


def upsample_patch_mask(patch_mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A patch-grid mask at the original size: the patch of each working-image pixel (a nearest
    upsampling that drops the padding), then a nearest resize to the original size by pixel centres
    (as PIL's NEAREST), composed into one index lookup."""
    (h, w), (height, width) = geometry.working, geometry.original
    patch_rows, patch_cols = working_to_patch(geometry)
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return patch_mask[patch_rows[rows][:, None], patch_cols[cols][None, :]]


# ----------------------------------------------------------------------------- dataset


class MaskGenDataset(Dataset):
    """Decodes, resizes (`InputPolicy`), normalises and pads images into network inputs.

    With `keep_working`, each item also holds the resized image as HxWx3 uint8 (for the CRF)."""

    def __init__(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]], policy: InputPolicy,
                 keep_working: bool = False) -> None:
        self.entries = {e.index: e for e in entries}
        self.sizes = sizes
        self.policy = policy
        self.keep_working = keep_working
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.entries)

    def geometry(self, index: int) -> Geometry:
        return self.policy.geometry(*self.sizes[index])

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        item = {"index": index, "image": None, "working": None, "error": None}
        try:
            img = load_rgb(entry.path)
        except ImageReadError as exc:
            item["error"] = str(exc)
            return item
        if (img.height, img.width) != self.sizes[index]:
            item["error"] = f"decoded size {img.height}x{img.width} differs from its header"
            return item
        geometry = self.geometry(index)
        (h, w), (hn, wn) = geometry.working, geometry.network
        if geometry.stretched:
            img = img.resize((w, h), Image.LANCZOS)
            network_img = img.resize((wn, hn), Image.LANCZOS)
        else:
            if (h, w) != (img.height, img.width):
                img = TF.resize(img, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            network_img = img
        tensor = (TF.pil_to_tensor(network_img).float().div_(255) - self.mean) / self.std
        if geometry.stretched:
            item["image"] = tensor
        else:
            padded = torch.zeros(3, hn, wn)
            padded[:, :h, :w] = tensor
            item["image"] = padded
        if self.keep_working:
            item["working"] = np.asarray(img)
        return item


def collate(items: list[dict]) -> dict:
    ok = [it for it in items if it["image"] is not None]
    return {
        "images": torch.stack([it["image"] for it in ok]) if ok else None,
        "working": [it["working"] for it in ok],
        "indices": [it["index"] for it in ok],
        "failed": [(it["index"], it["error"]) for it in items if it["image"] is None],
    }


def size_grouped_batches(dataset: MaskGenDataset, indices: list[int], batch_size: int) -> list[list[int]]:
    """Batches of images with equal network input size, ordered by their first image."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in indices:
        groups.setdefault(dataset.geometry(index).network, []).append(index)
    batches = [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]
    return sorted(batches, key=lambda b: b[0])

