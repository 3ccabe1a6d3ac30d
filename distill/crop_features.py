"""Mask sets and their crop features: box crops of every mask through the ViT, cached as .npy.

Used by distill/cluster.py. Per mask: crop the image to the mask's box, normalise with the ImageNet
mean/std, zero-pad to a multiple of the patch size and take the ViT's final normalised CLS token.
Crops are batched only with crops of the same padded size, so a crop's feature never depends on
its batch (padding to the batch maximum would add tokens and change the CLS token). Features are
cached by content: `<json stem>.features.<key>.npy` (+ a .json sidecar) next to the mask file (or in
a chosen folder), where the key hashes the mask file's bytes, the image root, the backbone and the crop
settings; any run on the same masks reuses them, whatever its output file. An interrupted extraction
resumes from a `.partial.npz`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.coco_io import (gt_ids_by_file_name, load_json, load_predictions, segmentation_to_rle, unknown_image_id,
                           write_json)
from utils.errors import UserError

FEATURE_VERSION = 2  # bump when the crop/feature recipe or the cache key changes: old caches become invalid


@dataclass(frozen=True)
class Backbone:
    """The ViT that makes the features, as gen_masks.py names it."""

    arch: str
    patch_size: int
    weights: str  # dino | random | a checkpoint path


# ----------------------------------------------------------------------------- inputs


@dataclass
class MaskSet:
    """A prediction file, its images and its image root."""

    name: str
    json_path: Path
    image_root: Path
    images: dict  # image id -> image dict
    annotations: list[dict]
    dataset: dict | None  # the input dict when the file was a full COCO dict
    skipped: list[dict] = field(default_factory=list)  # {"index", "image_id", "reason"}
    gt_ids: dict | None = None  # image id -> the same image's id in the ground truth, when matched by file_name


def load_mask_set(name: str, json_path: str | os.PathLike, image_root: str | os.PathLike,
                  gt_dataset: dict | None = None, gt_name: str = "") -> MaskSet:
    """Read a gen_masks JSON (full COCO dict) or a results list whose images come from `gt_dataset`."""
    json_path, image_root = Path(json_path), Path(image_root)
    if not image_root.is_dir():
        raise UserError(f"image root not found: {image_root}")
    anns, dataset = load_predictions(json_path)
    gt_ids = None
    if dataset is not None and dataset.get("images"):
        images = {img["id"]: img for img in dataset["images"]}
        for i, img in enumerate(dataset["images"]):
            for key in ("id", "file_name", "width", "height"):
                if key not in img:
                    raise UserError(f"{json_path}: images[{i}] has no '{key}'")
        if gt_dataset is not None:
            # Both files naming their images: the same image by file_name, whatever the ids; else ids are trusted.
            gt_ids = gt_ids_by_file_name(dataset["images"], gt_dataset["images"], str(json_path), gt_name)
            known = gt_ids if gt_ids is not None else {img["id"] for img in gt_dataset["images"]}
            for i, ann in enumerate(anns):
                if ann["image_id"] not in known:
                    raise UserError(f"{json_path}: annotation #{i} has image_id {ann['image_id']} which is not in "
                                    f"the ground truth {gt_name}")
    elif gt_dataset is not None:
        images = {img["id"]: img for img in gt_dataset["images"]}
    else:
        raise UserError(f"{json_path} is a results list without 'images'; pass --gt_file so that image file "
                        "names and sizes are known")
    for i, ann in enumerate(anns):
        if ann["image_id"] not in images:
            if gt_dataset is not None and not (dataset or {}).get("images"):  # a results list: ids must be the GT's
                raise unknown_image_id(str(json_path), i, ann["image_id"], f"the ground truth {gt_name}", False)
            raise UserError(f"{json_path}: annotation #{i} has image_id {ann['image_id']} which is not among "
                            "its images")
    return MaskSet(name, json_path, image_root, images, anns, dataset, gt_ids=gt_ids)


def crop_box(ann: dict, img: dict) -> tuple[int, int, int, int] | str:
    """Integer crop `(x0, y0, x1, y1)` of the mask's box clipped to the image, or why there is none."""
    box = ann.get("bbox")
    if box is None:
        try:
            from pycocotools import mask as mask_utils

            box = mask_utils.toBbox(segmentation_to_rle(ann["segmentation"], img["height"], img["width"])).tolist()
        except Exception as exc:
            return f"unreadable segmentation ({exc})"
    if not all(math.isfinite(v) for v in box):
        return f"non-finite box {box}"
    x, y, w, h = box
    x0, y0 = max(0, round(x)), max(0, round(y))
    x1, y1 = min(img["width"], round(x + w)), min(img["height"], round(y + h))
    if w <= 0 or h <= 0:
        return f"empty box {box}"
    if x1 <= x0 or y1 <= y0:
        return f"box {box} falls outside the {img['width']}x{img['height']} image"
    return x0, y0, x1, y1


def resolve_image_path(root: Path, file_name: str) -> Path:
    """`root/file_name`, else the same name directly under `root` or under `root/JPEGImages`."""
    for candidate in (root / file_name, root / Path(file_name).name, root / "JPEGImages" / Path(file_name).name):
        if candidate.is_file():
            return candidate
    raise UserError(f"image {file_name} not found under {root}")


def load_image_checked(path: Path, width: int, height: int):
    """RGB PIL image with the size the JSON says; falls back to ignoring EXIF rotation if that matches."""
    from PIL import Image

    from utils.images import ImageReadError, load_rgb, to_rgb

    try:
        image = load_rgb(path)
    except ImageReadError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    if image.size != (width, height):
        with Image.open(path) as raw:
            raw.load()
            if raw.size == (width, height):
                return to_rgb(raw)
        raise UserError(f"image {path} is {image.size[0]}x{image.size[1]} but the JSON says {width}x{height}; "
                        "is the image root right?")
    return image


# ----------------------------------------------------------------------------- features


class CropDataset:
    """Per image: the normalised, zero-padded crops of its masks, as (annotation index, CHW tensor) pairs."""

    def __init__(self, image_root: Path, items: list[tuple[dict, list[tuple[int, tuple]]]], patch_size: int) -> None:
        self.image_root, self.items, self.patch_size = image_root, items, patch_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list | str:
        """The image's crops, or the one-line reason it cannot be read: a UserError raised inside a
        DataLoader worker would reach the user wrapped in the worker's traceback."""
        import torch
        import torchvision.transforms.functional as TF

        from utils.images import IMAGENET_MEAN, IMAGENET_STD

        img, crops = self.items[i]
        try:
            image = load_image_checked(resolve_image_path(self.image_root, img["file_name"]), img["width"], img["height"])
        except UserError as exc:
            return str(exc)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        p = self.patch_size
        out = []
        for index, (x0, y0, x1, y1) in crops:
            h, w = y1 - y0, x1 - x0
            padded = torch.zeros(3, math.ceil(h / p) * p, math.ceil(w / p) * p)
            padded[:, :h, :w] = tensor[:, y0:y1, x0:x1]
            out.append((index, padded))
        return out


def _first(batch: list) -> list:
    return batch[0]


def weights_identity(weights: str) -> str:
    """What identifies the backbone weights for the cache key (`random` weights are seeded, so fixed)."""
    if weights in ("random", "dino"):
        return weights
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file (use 'dino', 'random' or a checkpoint path)")
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(mask_set: MaskSet, backbone: Backbone, half: bool) -> str:
    """Hash of everything a feature depends on: the mask file's bytes, the image root, the backbone, the
    crop recipe and the precision; never the name of any output."""
    digest = hashlib.sha256()
    with open(mask_set.json_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps([FEATURE_VERSION, str(mask_set.image_root.resolve()), backbone.arch,
                              backbone.patch_size, weights_identity(backbone.weights), half]).encode())
    return digest.hexdigest()[:16]


def cache_path(mask_set: MaskSet, cache_dir: Path | None, backbone: Backbone, half: bool) -> Path:
    """`<json stem>.features.<key>.npy` in `cache_dir`, by default next to the mask file."""
    folder = cache_dir if cache_dir is not None else mask_set.json_path.parent
    return folder / f"{mask_set.json_path.stem}.features.{cache_key(mask_set, backbone, half)}.npy"


def extract_features(mask_set: MaskSet, model, device, patch_size: int, batch_size: int = 32,
                     num_workers: int = 0, half: bool = False, partial_path: Path | None = None,
                     save_every_s: float = 120.0, progress: bool | None = None) -> np.ndarray:
    """(N, D) float32 CLS features, one row per annotation; NaN rows for skipped masks
    (their reasons are appended to `mask_set.skipped`). With `partial_path`, progress is saved
    every `save_every_s` seconds and an interrupted run resumes from it."""
    import torch
    from torch.utils.data import DataLoader
    from utils.progress import Progress

    dim = model.vit.embed_dim
    features = np.full((len(mask_set.annotations), dim), np.nan, dtype=np.float32)
    done = np.zeros(len(mask_set.annotations), dtype=bool)
    if partial_path is not None and partial_path.is_file():
        with np.load(partial_path) as saved:
            if saved["features"].shape == features.shape:
                features, done = saved["features"], saved["done"]
                print(f"resuming {mask_set.name} features: {int(done.sum())} of {len(done)} masks already done")

    per_image: dict = {}
    for index, ann in enumerate(mask_set.annotations):
        img = mask_set.images[ann["image_id"]]
        box = crop_box(ann, img)
        if isinstance(box, str):
            mask_set.skipped.append({"index": index, "image_id": ann["image_id"], "reason": box})
            continue
        if not done[index]:
            per_image.setdefault(ann["image_id"], (img, []))[1].append((index, box))
    for entry in mask_set.skipped:
        print(f"warning: {mask_set.json_path}: mask #{entry['index']} (image {entry['image_id']}) skipped: {entry['reason']}")

    dataset = CropDataset(mask_set.image_root, list(per_image.values()), patch_size)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if half else contextlib.nullcontext()
    buckets: dict = {}  # padded (h, w) -> [(index, crop)]
    pending = 0
    max_pending = max(4 * batch_size, 64)  # bounds host memory held in partly filled buckets

    def run(shape: tuple) -> None:
        nonlocal pending
        group = buckets.pop(shape)
        pending -= len(group)
        batch = torch.stack([crop for _, crop in group]).to(device, non_blocking=True)
        with torch.inference_mode(), autocast:
            out = model.cls_features(batch).float().cpu().numpy()
        for (index, _), row in zip(group, out):
            features[index] = row
            done[index] = True

    last_save = time.monotonic()
    total = sum(len(c) for _, c in per_image.values())
    bar = Progress(total=total, desc=f"features ({mask_set.name})", unit="crop", enabled=progress is not False)
    try:
        for crops in loader:
            if isinstance(crops, str):  # an unreadable image: one clear error (finished crops are kept)
                raise UserError(crops)
            for index, crop in crops:
                shape = tuple(crop.shape[1:])
                buckets.setdefault(shape, []).append((index, crop))
                pending += 1
                if len(buckets[shape]) >= batch_size:
                    run(shape)
            if pending > max_pending:
                for shape in sorted(buckets, key=lambda s: -len(buckets[s])):
                    run(shape)
            bar.update(len(crops))
            if partial_path is not None and time.monotonic() - last_save > save_every_s:
                _save_partial(partial_path, features, done)
                last_save = time.monotonic()
        for shape in list(buckets):
            run(shape)
    except (UserError, KeyboardInterrupt) as exc:
        # Keep what is finished so that the next run resumes after the fix instead of starting over.
        if partial_path is not None:
            if isinstance(exc, UserError):  # crops already decoded are cheap to finish
                for shape in list(buckets):
                    run(shape)
            if done.any():
                _save_partial(partial_path, features, done)
        raise
    finally:
        bar.close()
    return features


def _save_partial(path: Path, features: np.ndarray, done: np.ndarray) -> None:
    from utils.coco_io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, done=done)


def cached_features(mask_set: MaskSet, path: Path, backbone: Backbone, half: bool, batch_size: int,
                    num_workers: int, get_model) -> np.ndarray:
    """Features of one mask set, from the cache file `path` (see `cache_path`) if present, else computed
    with `get_model()` -> (model, device) and saved there."""
    from utils.coco_io import atomic_path

    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        meta = load_json(sidecar, "feature cache sidecar")
        features = np.load(path)
        if features.shape[0] == len(mask_set.annotations):
            mask_set.skipped.extend(meta.get("skipped", []))
            for entry in mask_set.skipped:
                print(f"warning: {mask_set.json_path}: mask #{entry['index']} (image {entry['image_id']}) "
                      f"skipped: {entry['reason']}")
            print(f"loaded cached features for {mask_set.name}: {path}")
            return features
    model, device = get_model()
    partial = path.with_suffix(".partial.npz")
    features = extract_features(mask_set, model, device, backbone.patch_size, batch_size, num_workers, half,
                                partial_path=partial)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, features)
    write_json(sidecar, {"input_file": str(mask_set.json_path), "image_root": str(mask_set.image_root),
                         "arch": backbone.arch, "patch_size": backbone.patch_size, "weights": backbone.weights,
                         "half": half, "feature_version": FEATURE_VERSION, "num_masks": len(mask_set.annotations),
                         "skipped": mask_set.skipped}, indent=1)
    if partial.exists():
        partial.unlink()
    print(f"saved features for {mask_set.name}: {path}")
    return features
