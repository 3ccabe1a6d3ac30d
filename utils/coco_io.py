"""The one reader and writer of the pipeline's COCO files: masks <-> RLE, boxes, atomic writes.

Contracts (see DESIGN.md): masks are RLE with `counts` as a UTF-8 string (polygons are accepted
on input), `bbox` is `[x, y, w, h]` in pixels of the original image, and every file is written
to a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pycocotools import mask as mask_utils

from utils import validate
from utils.errors import UserError

# The one category of class-agnostic files: gen_masks.py output, class-agnostic GT and training.
OBJECT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}

# ----------------------------------------------------------------------------- atomic writes


def _create_temp_file(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file in `folder` with the mode a plain `open(path, "w")` gives (0666 less the
    umask; `tempfile.mkstemp` would make it 0600), without touching the process-wide umask."""
    for _ in range(100):
        candidate = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"no free temporary name in {folder}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The result has the permissions `open(path, "w")` would give: those of the file it replaces, else
    0666 less the umask (0644 under umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically; file names that are not UTF-8 (read from disk as lone surrogates)
    are written back as their original bytes, so that a list names the files exactly."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape")


def read_text_lines(path: str | os.PathLike, what: str = "list file") -> list[str]:
    """The non-blank lines of a text file, stripped. Bytes that are not UTF-8 (file names made on another
    system) come back as lone surrogates, which name the same files on disk (see `write_text`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if "\0" in text:
        raise UserError(f"{what} {path} is not a text file (it holds NUL bytes); expected one name per line")
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- reading


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text JSON file") from None


def load_coco_dataset(path: str | os.PathLike) -> dict:
    """Load and check a COCO dataset dict (`images`, `annotations`, `categories`).

    Every entry is checked by `utils.validate` against its image (unique image and annotation ids,
    finite boxes and polygons, RLE that fits its image), so no stage hands pycocotools a broken entry.
    """
    data = load_json(path, "COCO dataset")
    if not isinstance(data, dict) or "images" not in data:
        raise UserError(f"{path} is not a COCO dataset: expected a dict with 'images'")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    if not isinstance(data["annotations"], list):
        raise UserError(f"{path}: 'annotations' is not a list")
    images = validate.check_images(data["images"], str(path))
    validate.check_annotations(data["annotations"], str(path), images, require_image=True)
    validate.check_annotation_ids(data["annotations"], str(path))
    return data


def load_predictions(path: str | os.PathLike) -> tuple[list[dict], dict | None]:
    """Load predictions: a COCO results list, or a full COCO dict whose annotations carry scores.

    Returns (annotations, dataset-or-None). Missing scores default to 1.0. Entries are checked by
    `utils.validate`; in a COCO dict, masks are also checked against the dict's own images. Callers
    check a results list against their ground truth with `check_image_ids`.
    """
    data = load_json(path, "predictions file")
    images: dict = {}
    if isinstance(data, list):
        anns, dataset = data, None
    elif isinstance(data, dict) and "annotations" in data:
        anns, dataset = data["annotations"], data
        if not isinstance(anns, list):
            raise UserError(f"{path}: 'annotations' is not a list")
        if "images" in data:
            images = validate.check_images(data["images"], str(path))
    else:
        raise UserError(f"{path}: expected a COCO results list or a dict with 'annotations'")
    validate.check_annotations(anns, str(path), images, require_image=False)
    for ann in anns:
        ann.setdefault("score", 1.0)
    return anns, dataset


check_annotation = validate.check_annotation  # the per-entry check, for in-memory annotations


# ----------------------------------------------------------------------------- masks and boxes


def mask_to_rle(mask: np.ndarray) -> dict:
    """Binary HxW mask -> compressed RLE with `counts` as a str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def segmentation_to_rle(segm: list | dict, height: int, width: int) -> dict:
    """Polygons, uncompressed RLE or compressed RLE -> compressed RLE (counts may be bytes)."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    rle = dict(segm)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("utf-8")
    return rle


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation -> HxW uint8 mask."""
    return mask_utils.decode(segmentation_to_rle(segm, height, width)).astype(np.uint8)


def mask_to_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """Binary mask -> COCO polygons (the outer contours), or None when a part of the mask has no valid polygon:
    a straight line one pixel wide, or a single pixel, traces fewer than 3 points (which pycocotools refuses),
    and an outline of no area would lose its pixels."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours or any(len(c) < 3 or cv2.contourArea(c) == 0 for c in contours):
        return None
    return [c.reshape(-1).astype(float).tolist() for c in contours]


def mask_to_bbox(mask: np.ndarray) -> list[float]:
    """Tight `[x, y, w, h]` box of a binary mask (pixel edges); zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def box_iou_xywh(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of `[x, y, w, h]` boxes, shape (len(a), len(b))."""
    a, b = xywh_to_xyxy(boxes_a), xywh_to_xyxy(boxes_b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def make_annotation(mask: np.ndarray, image_id: int, category_id: int = 1, score: float = 1.0,
                    mask_format: str = "rle", ann_id: int | None = None) -> dict:
    """A COCO annotation for a binary mask, with box, area and score."""
    if mask_format == "rle":
        segmentation: Any = mask_to_rle(mask)
    elif mask_format == "polygon":
        segmentation = mask_to_polygons(mask)
        if segmentation is None:  # too thin for a polygon: this annotation keeps the mask as RLE
            segmentation = mask_to_rle(mask)
    else:
        raise ValueError(f"unknown mask format {mask_format!r}")
    ann = {
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": mask_to_bbox(mask),
        "area": float(mask.sum()),
        "score": float(score),
        "iscrowd": 0,
    }
    if ann_id is not None:
        ann["id"] = ann_id
    return ann


def posix_file_name(name: object) -> str:
    """A COCO `file_name` as a POSIX path (Windows separators turned, a leading './' dropped)."""
    return Path(str(name).replace("\\", "/")).as_posix()


class ImagesByName:
    """COCO images looked up by `file_name`: the same path (POSIX, without a leading './'), else the same base name
    when a single image has it. How the images of two files are matched when their ids cannot be trusted."""

    def __init__(self, images: list[dict]) -> None:
        self.by_path: dict[str, dict] = {}
        by_base: dict[str, list[dict]] = {}
        for img in images:
            if img.get("file_name"):
                path = posix_file_name(img["file_name"])
                self.by_path[path] = img
                by_base.setdefault(Path(path).name, []).append(img)
        self.by_base = {base: found[0] for base, found in by_base.items() if len(found) == 1}

    def find(self, file_name: object) -> dict | None:
        path = posix_file_name(file_name)
        return self.by_path.get(path) or self.by_base.get(Path(path).name)


def image_index(dataset: dict) -> dict[int, dict]:
    return {img["id"]: img for img in dataset["images"]}


def annotations_by_image(anns: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for ann in anns:
        grouped.setdefault(ann["image_id"], []).append(ann)
    return grouped


def reference_name(dataset: dict, path: str | os.PathLike) -> str:
    """What an evaluation compares with, for summary lines: "the pseudo-labels in PATH" when the COCO dataset
    was written by this toolkit's mask discovery or self-training (its info.description names pseudo-masks or
    pseudo-labels: gen_masks.py, gen_pa_masks.py, train_net.py's rounds), else "the ground truth in PATH"."""
    description = str((dataset.get("info") or {}).get("description", "")).lower()
    kind = "pseudo-labels" if "pseudo-mask" in description or "pseudo-label" in description else "ground truth"
    return f"the {kind} in {os.fspath(path)}"


def confident_else_best(preds: list[dict], threshold: float) -> tuple[list[dict], list[dict]]:
    """Split one image's predictions into (kept, rest): those scoring at least `threshold` (score >= threshold),
    or, when none does, the single best one (the first of equal best scores), as MaskDistill keeps every image
    with predictions labelled. A prediction without a score counts as 1.0. Both lists keep the input order."""
    def score(p: dict) -> float:
        return float(p.get("score", 1.0))

    kept = [p for p in preds if score(p) >= threshold]
    if not kept and preds:
        kept = [max(preds, key=score)]
    chosen = {id(p) for p in kept}
    return kept, [p for p in preds if id(p) not in chosen]


def unknown_image_id(pred_name: str, index: int, image_id: object, gt_name: str, names_images: bool) -> UserError:
    """The error for prediction #`index` on an image the GT does not have. A file that names no images (a
    results list) can only be matched by id, so the message says which file to pass instead."""
    message = f"{pred_name}: annotation #{index} has image_id {image_id!r} which is not in {gt_name}"
    if not names_images:
        message += (" (a results list names no files, so its ids must be the GT's: pass the COCO dataset the "
                    "predictions were made for, e.g. train_net.py's --test_json, or a predictions file with "
                    "'images' to match by file_name)")
    return UserError(message)


def check_image_ids(pred_anns: list[dict], dataset: dict, pred_name: str, gt_name: str,
                    names_images: bool = True) -> None:
    """Every prediction must refer to an image of the dataset, and its mask must fit that image (RLE
    size, polygon coordinates); name the first that does not. `names_images=False` (a results list) adds to
    an unknown id's message what to pass instead."""
    known = {img["id"]: img for img in dataset["images"]}
    for i, ann in enumerate(pred_anns):
        image = known.get(ann["image_id"])
        if image is None:
            raise unknown_image_id(pred_name, i, ann["image_id"], gt_name, names_images)
        if "segmentation" in ann:
            validate.check_mask_fits_image(ann["segmentation"], f"{pred_name}: annotation #{i}", image)


def find_by_file_name(names: list[object], gt_images: list[dict], gt_name: str,
                      hint: str = "") -> list[dict | None]:
    """The one image identity every tool uses: the GT image of each name (a `file_name` or a path relative to
    the image root), by `ImagesByName` (the same relative path, else the same base name when one GT image has
    it), None where there is none. Two names matching one GT image is an error (`hint` says what to do)."""
    gt_by_name = ImagesByName(gt_images)
    found: list[dict | None] = []
    owner: dict = {}
    for name in names:
        img = gt_by_name.find(name)
        if img is not None:
            if img["id"] in owner:
                raise UserError(f"{owner[img['id']]!r} and {posix_file_name(name)!r} both match image "
                                f"{img['file_name']!r} of {gt_name} (by file_name){hint}")
            owner[img["id"]] = posix_file_name(name)
        found.append(img)
    return found


def names_all_images(images: list[dict] | None) -> bool:
    return bool(images) and all(img.get("file_name") for img in images)


def gt_ids_by_file_name(images: list[dict], gt_images: list[dict], name: str, gt_name: str,
                        gt_flag: str = "--gt_file") -> dict | None:
    """{id in `images`: id of the same image in `gt_images`}, matched by `find_by_file_name` whatever the ids,
    when both lists name all their images; None when either does not (then ids are trusted). An image in no GT
    image, or whose height/width differ from its GT image's, is an error saying what to pass (`gt_flag`)."""
    if not names_all_images(images) or not names_all_images(gt_images):
        return None
    remap: dict = {}
    for img, gt_img in zip(images, find_by_file_name([img["file_name"] for img in images], gt_images, gt_name)):
        file_name = posix_file_name(img["file_name"])
        if gt_img is None:
            raise UserError(f"{name}: image {file_name!r} (id {img['id']!r}) is not in {gt_name} (matched by "
                            f"file_name); pass the {gt_flag} the predictions were made for, or make them with "
                            f"gen_masks.py --gt_json {gt_name}")
        if (img["height"], img["width"]) != (gt_img["height"], gt_img["width"]):
            raise UserError(f"{name}: image {file_name!r} is {img['height']}x{img['width']} (h x w) but "
                            f"{gt_img['height']}x{gt_img['width']} in {gt_name}: not the same image; pass the "
                            f"{gt_flag} the predictions were made for")
        remap[img["id"]] = gt_img["id"]
    return remap


def match_by_file_name(pred_anns: list[dict], pred_dataset: dict | None, gt_images: list[dict], pred_name: str,
                       gt_name: str, gt_flag: str = "--gt_file") -> tuple[list[dict], list | None]:
    """Match predictions to GT images by `file_name` (`gt_ids_by_file_name`) when both files name their images (a
    COCO dict of predictions, as `gen_masks.py` writes, and a GT whose images all have names), whatever their ids:
    ids are remapped to the GT's. Returns (the annotations, the GT ids of the predictions' images in their order),
    or the annotations unchanged and None when either file lacks names (then ids are trusted)."""
    remap = gt_ids_by_file_name((pred_dataset or {}).get("images") or [], gt_images, pred_name, gt_name, gt_flag)
    if remap is None:
        return pred_anns, None
    remapped = []
    for i, ann in enumerate(pred_anns):
        if ann["image_id"] not in remap:
            raise UserError(f"{pred_name}: annotation #{i} has image_id {ann['image_id']!r}, which is not in its "
                            "own 'images'")
        remapped.append({**ann, "image_id": remap[ann["image_id"]]})
    return remapped, list(remap.values())


# ----------------------------------------------------------------------------- outputs


def check_can_write(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: str | os.PathLike, what: str | None = None) -> None:
    """Fail early, in one line, when files cannot be created in `folder` (or in the folders that would be
    made for it): a parent is a file, a read-only place, /proc. Nothing is left behind: no folder is
    created and the probe file is removed. `what` names the output in the message."""
    what = what or f"output folder {folder}"
    existing = _nearest_existing(Path(folder))
    if not existing.is_dir():
        raise UserError(f"cannot write {what}: {existing} is a file, not a folder")
    try:
        _create_temp_file(existing, ".write-probe.", ".tmp").unlink()
    except OSError as exc:
        raise UserError(f"cannot write {what}: no file can be created in {existing} ({exc.strerror or exc})") from None


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, in one line, when an output file cannot be written (it is a folder, or its folder cannot
    be created or written), so that a long job does not end in a traceback after all its work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder, not a file")
    check_writable_folder(path.parent, f"output {path}")
