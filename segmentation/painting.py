"""Instance predictions (COCO results) -> semantic pseudo-labels (VOC-palette PNGs) and an image list."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from utils.coco_io import (annotations_by_image, check_image_ids, confident_else_best, decode_segmentation,
                           image_index, load_coco_dataset, load_predictions, write_json, write_text)
from utils.errors import UserError
from utils.label_png import IGNORE_INDEX, write_label_png
from utils.progress import progress


def paint_semantic(preds: list[dict], height: int, width: int, threshold: float = 0.0,
                   ignore_uncertain: bool = False, class_of: dict[int, int] | None = None) -> np.ndarray:
    """Paint the predictions of one image into an HxW uint8 class map (0 = background).

    Masks are painted in increasing score order, so the most confident prediction wins where masks
    overlap. With `ignore_uncertain`, pixels covered only by predictions below the threshold become 255.
    `class_of` maps category ids to label values (identity when None).
    """
    label = np.zeros((height, width), dtype=np.uint8)
    confident, uncertain = confident_else_best(preds, threshold)
    if ignore_uncertain:
        for pred in uncertain:
            label[_mask(pred, height, width) > 0] = IGNORE_INDEX
    for pred in sorted(confident, key=lambda p: p["score"]):  # stable: ties keep file order
        category = int(pred["category_id"])
        value = class_of[category] if class_of is not None else category
        label[_mask(pred, height, width) > 0] = value
    return label


def _mask(pred: dict, height: int, width: int) -> np.ndarray:
    segm = pred.get("segmentation")
    if segm is None:  # box-only prediction: fill the box
        x, y, w, h = pred["bbox"]
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[max(int(round(y)), 0):int(round(y + h)), max(int(round(x)), 0):int(round(x + w))] = 1
        return mask
    return decode_segmentation(segm, height, width)


def category_values(category_ids: list[int], mode: str) -> dict[int, int] | None:
    """How category ids become label values: `category_id` (identity) or `contiguous` (1..K in id order)."""
    if mode == "category_id":
        bad = [c for c in category_ids if not 1 <= int(c) <= 254]
        if bad:
            raise UserError(f"category id {bad[0]} cannot be a label value (need 1..254); use --class_ids contiguous")
        return None
    if mode == "contiguous":
        ordered = sorted({int(c) for c in category_ids})
        if len(ordered) > 254:
            raise UserError(f"{len(ordered)} categories do not fit in a PNG label map (at most 254)")
        return {c: i + 1 for i, c in enumerate(ordered)}
    raise UserError(f"unknown --class_ids mode {mode!r}; use category_id or contiguous")


def label_name(file_name: str, image_subdir: str = "") -> str:
    """The list entry of an image: its path relative to `image_subdir` of the image root, without extension."""
    path = Path(file_name)
    if image_subdir:
        path = path.relative_to(image_subdir)
    return path.with_suffix("").as_posix()


def common_image_folder(file_names: list[str]) -> str:
    """The deepest folder (relative to the image root) holding every image, "" when there is none.

    VOC datasets name images `VOC2012/JPEGImages/<id>.jpg` from the VOCdevkit root: the labels become
    `<id>.png` and the list holds `<id>`, which DeepLab training reads with data.image_dir=VOCdevkit/VOC2012/JPEGImages.
    """
    parents = [Path(name).parent.parts for name in file_names]
    if not parents:
        return ""
    common = []
    for parts in zip(*parents):
        if len(set(parts)) != 1 or parts[0] in ("..", "/") or Path(parts[0]).is_absolute():
            break
        common.append(parts[0])
    return Path(*common).as_posix() if common else ""


SETTINGS_FILE = "gen_segmentation.json"


def check_settings(path: Path, settings: dict, overwrite: bool) -> None:
    """A resumed run must paint like the one that wrote the folder, else the PNGs would mix two settings."""
    if overwrite or not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    changed = [k for k in settings if k in previous and previous[k] != settings[k]]
    if changed:
        key = changed[0]
        if key in ("results_size", "results_mtime_ns"):
            raise UserError(f"{settings['results']} has changed since {path.parent} was painted from it; "
                            f"pass --overwrite to repaint it, or choose another --out_dir")
        raise UserError(f"{path.parent} was painted with {key}={previous[key]!r}, not {settings[key]!r}; "
                        f"pass --overwrite to repaint it, or choose another --out_dir")


def label_names(images: dict[int, dict], source: str, image_subdir: str = "") -> dict[int, str]:
    """image id -> list entry; refuses names that leave the output folder or that two images share."""
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for image_id, info in sorted(images.items()):
        file_name = info.get("file_name", str(image_id))
        if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
            raise UserError(f"{source}: image {image_id} has file_name {info.get('file_name')!r}; "
                            f"it must be relative to the image root")
        name = label_name(file_name, image_subdir)
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{source}: image {image_id} has file_name {info.get('file_name')!r}; "
                            f"it must be relative to the image root")
        if name in seen:
            raise UserError(f"{source}: images {seen[name]!r} and {image_id!r} would both write {name + '.png'!r}")
        seen[name] = image_id
        names[image_id] = name
    return names


def generate_segmentation(results_path: str | os.PathLike, dataset_path: str | os.PathLike,
                          out_dir: str | os.PathLike, list_path: str | os.PathLike | None = None,
                          threshold: float = 0.5, ignore_uncertain: bool = False,
                          class_ids: str = "category_id", overwrite: bool = False,
                          keep_empty: bool = False) -> dict:
    """Write one label PNG per image of the dataset, plus the image list. Returns a summary.

    Labels are named like their image relative to the deepest folder holding all the images
    (`common_image_folder`, returned as `image_subdir`): VOC's `VOC2012/JPEGImages/<id>.jpg` gives
    `<id>.png`. An image without any prediction is left out of the list and not painted (a warning names
    it): an all-background map would teach that its objects are background. `keep_empty` paints such
    images all background and lists them (data where an empty image is truly empty). Already written
    PNGs are kept (the job resumes) unless `overwrite` is set.
    """
    preds, _ = load_predictions(results_path)
    dataset = load_coco_dataset(dataset_path)
    check_image_ids(preds, dataset, str(results_path), str(dataset_path))  # ids, and masks fit their images
    for i, pred in enumerate(preds):
        if "category_id" not in pred:
            raise UserError(f"{results_path}: annotation #{i} has no 'category_id'")
    category_ids = [c["id"] for c in dataset["categories"]] or sorted({p["category_id"] for p in preds})
    unknown = {p["category_id"] for p in preds} - set(category_ids)
    if unknown:
        raise UserError(f"{results_path}: category_id {sorted(unknown)[0]} is not among the categories of {dataset_path}")
    class_of = category_values(category_ids, class_ids)
    images = image_index(dataset)
    image_subdir = common_image_folder([info.get("file_name", str(i)) for i, info in images.items()])
    names = label_names(images, str(dataset_path), image_subdir)  # all checks come before anything is written

    out_dir = Path(out_dir)
    list_path = Path(list_path) if list_path is not None else out_dir / "train.txt"
    results_stat = Path(results_path).stat()
    # The results file's size and time too: a rewritten results.json must not resume on old PNGs.
    settings = {"results": str(Path(results_path).resolve()), "results_size": results_stat.st_size,
                "results_mtime_ns": results_stat.st_mtime_ns, "dataset": str(Path(dataset_path).resolve()),
                "threshold": float(threshold), "ignore_uncertain": bool(ignore_uncertain), "class_ids": class_ids,
                "keep_empty": bool(keep_empty), "image_subdir": image_subdir}
    by_image = annotations_by_image(preds)
    if not keep_empty and not any(image_id in by_image for image_id in images):
        raise UserError(f"{results_path}: no image of {dataset_path} has a prediction: nothing to train on")
    check_settings(out_dir / SETTINGS_FILE, settings, overwrite)
    write_json(out_dir / SETTINGS_FILE, settings, indent=1)  # before painting: an interrupted run is covered too
    stats = {"images": 0, "written": 0, "skipped": 0, "fallback": 0, "empty": 0}
    listed, empty = [], []
    for image_id, info in progress(sorted(images.items()), desc="painting", unit="img"):
        name = names[image_id]
        stats["images"] += 1
        image_preds = by_image.get(image_id, [])
        if not image_preds:
            stats["empty"] += 1
            empty.append(name)
            if not keep_empty:
                continue
        elif not any(float(p.get("score", 1.0)) >= threshold for p in image_preds):
            stats["fallback"] += 1
        listed.append(image_id)
        target = out_dir / f"{name}.png"
        if target.exists() and not overwrite:
            stats["skipped"] += 1
            continue
        label = paint_semantic(image_preds, int(info["height"]), int(info["width"]), threshold,
                               ignore_uncertain, class_of)
        write_label_png(target, label)
        stats["written"] += 1
    if empty and not keep_empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        print(f"warning: {len(empty)} of {len(images)} images have no prediction and are left out of "
              f"{list_path} (keep_empty / --keep_empty paints them all background): {shown}", file=sys.stderr)
    write_text(list_path, "".join(f"{names[i]}\n" for i in listed))
    stats.update(list=str(list_path), label_dir=str(out_dir), image_subdir=image_subdir, listed=len(listed))
    if class_of is not None:  # record which category became which label value
        write_json(out_dir / "class_map.json", {str(k): v for k, v in class_of.items()}, indent=1)
        stats["class_map"] = str(out_dir / "class_map.json")
    return stats
