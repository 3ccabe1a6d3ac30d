"""Checks of COCO entries before they reach pycocotools: one place, used by every reader in `utils.coco_io`.

pycocotools trusts its input: a NaN polygon coordinate exhausts memory or segfaults, an RLE whose runs
do not add up to height x width decodes to uninitialised memory or raises a bare ValueError, and a
NaN box or score silently changes AP and CorLoc. Every entry is therefore checked when a file is loaded,
and each problem is one `UserError` naming the file, the entry's index and the culprit.

The checks are cheap (no mask is decoded): polygons are summed, compressed RLE counts are parsed with
numpy (`rle_counts_total`), uncompressed counts are summed.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from utils.errors import UserError

# A run in a compressed RLE string is at most 6 characters (30 bits) in pycocotools' reader; longer
# runs overflow its C ints. That is a run of 2^29 pixels, far beyond any real image.
MAX_RLE_RUN_CHARS = 6


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """`repr`, shortened: an error line names the culprit, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- images


def check_images(images: Any, source: str) -> dict[Any, dict]:
    """Check a COCO `images` list; returns the images by id.

    Each image needs an `id` (unique) and a positive whole `width` and `height`.
    """
    if not isinstance(images, list):
        raise UserError(f"{source}: 'images' is not a list")
    by_id: dict[Any, dict] = {}
    first_index: dict[Any, int] = {}
    for i, img in enumerate(images):
        where = f"{source}: images[{i}]"
        if not isinstance(img, dict):
            raise UserError(f"{where} is not an object")
        for key in ("id", "width", "height"):
            if key not in img:
                raise UserError(f"{where} has no '{key}'")
        image_id = img["id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise UserError(f"{where} has an 'id' {_describe(image_id)} that is neither an integer nor a string")
        for key in ("width", "height"):
            value = img[key]
            if not (_is_number(value) and math.isfinite(value) and value > 0 and value == int(value)):
                raise UserError(f"{where} (id {image_id!r}) has '{key}' {_describe(value)}; "
                                f"expected a positive integer")
        if by_id and type(image_id) is not type(next(iter(by_id))):
            raise UserError(f"{where} has id {image_id!r}, but images[0] has id {images[0]['id']!r}: image ids "
                            f"must be all integers or all strings")
        if image_id in by_id:
            raise UserError(f"{source}: images[{first_index[image_id]}] and images[{i}] have the same id {image_id!r}")
        by_id[image_id] = img
        first_index[image_id] = i
    return by_id


# ----------------------------------------------------------------------------- annotations


def check_annotations(annotations: list, source: str, images: dict[Any, dict],
                      require_image: bool) -> None:
    """Check every annotation (`check_annotation`) and, where its image is in `images`, that its mask fits
    the image; with `require_image`, an annotation of an image not in `images` is an error too."""
    for i, ann in enumerate(annotations):
        check_annotation(ann, i, source)
        image = images.get(ann["image_id"])
        if image is None:
            if require_image:
                raise UserError(f"{source}: annotations[{i}] refers to image_id {ann['image_id']!r} not in 'images'")
        elif "segmentation" in ann:
            check_mask_fits_image(ann["segmentation"], f"{source}: annotation #{i}", image)


def check_annotation(ann: Any, index: int, source: str, require_score: bool = False) -> None:
    """Check one annotation or result on its own (its image is `check_mask_fits_image`'s business)."""
    where = f"{source}: annotation #{index}"
    if not isinstance(ann, dict):
        raise UserError(f"{where} is not an object")
    if "image_id" not in ann:
        raise UserError(f"{where} has no 'image_id'")
    if not isinstance(ann["image_id"], (int, str)) or isinstance(ann["image_id"], bool):
        raise UserError(f"{where} has an 'image_id' {_describe(ann['image_id'])} that is neither an integer nor a "
                        f"string")
    if "segmentation" not in ann and "bbox" not in ann:
        raise UserError(f"{where} has neither 'segmentation' nor 'bbox'")
    if "bbox" in ann:
        check_bbox(ann["bbox"], where)
    if "segmentation" in ann:
        check_segmentation(ann["segmentation"], where)
    if "area" in ann and not (_is_number(ann["area"]) and math.isfinite(ann["area"]) and ann["area"] >= 0):
        raise UserError(f"{where} has an 'area' {_describe(ann['area'])}; expected a finite number >= 0")
    if require_score and "score" not in ann:
        raise UserError(f"{where} has no 'score'")
    if "score" in ann:
        score = ann["score"]
        if not _is_number(score):
            raise UserError(f"{where} has a non-numeric 'score' {_describe(score)}")
        if not math.isfinite(score):
            raise UserError(f"{where} has a non-finite 'score' {score!r}")


def check_bbox(box: Any, where: str) -> None:
    """`[x, y, w, h]`: four finite numbers, width and height >= 0."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise UserError(f"{where} has a malformed 'bbox' {_describe(box)}; expected [x, y, w, h]")
    if not all(math.isfinite(v) for v in box):
        raise UserError(f"{where} has a 'bbox' {_describe(box)} with a non-finite value")
    if box[2] < 0 or box[3] < 0:
        raise UserError(f"{where} has a 'bbox' {_describe(box)} with a negative width or height")


def check_segmentation(segm: Any, where: str) -> None:
    """Polygons, compressed RLE or uncompressed RLE, checked without decoding."""
    if isinstance(segm, dict):
        check_rle(segm, where)
    elif isinstance(segm, list):
        check_polygons(segm, where)
    else:
        raise UserError(f"{where} has a 'segmentation' that is neither RLE nor polygons")


def check_polygons(polygons: list, where: str) -> None:
    """Lists of >= 3 x,y pairs of finite numbers."""
    if not polygons:
        raise UserError(f"{where} has an empty polygon list")
    for p in polygons:
        if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
            raise UserError(f"{where} has a malformed polygon (need lists of >= 3 x,y pairs)")
        try:
            total = float(sum(p))  # one C loop: a non-number raises, a NaN or infinity makes the sum non-finite
        except (TypeError, OverflowError):
            bad = next((v for v in p if not _is_number(v)), None)
            raise UserError(f"{where} has a polygon with a non-numeric coordinate {_describe(bad)}") from None
        if not math.isfinite(total):
            bad = next((v for v in p if not math.isfinite(v)), max(p, key=abs))
            raise UserError(f"{where} has a polygon with a non-finite or huge coordinate {bad!r}")


def check_rle(rle: dict, where: str) -> None:
    """`size` [h, w] and `counts` whose runs add up to h x w."""
    if "counts" not in rle or "size" not in rle:
        raise UserError(f"{where} has an RLE without 'counts'/'size'")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise UserError(f"{where} has an RLE 'size' {_describe(size)}; expected [height, width]")
    height, width = size
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            raise UserError(f"{where} has uncompressed RLE counts that are not all non-negative integers")
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        total = rle_counts_total(counts)
        if total is None:
            raise UserError(f"{where} has RLE counts that are not a valid compressed RLE string "
                            f"({_describe(counts)})")
    else:
        raise UserError(f"{where} has RLE counts of type {type(counts).__name__}; expected a string or a list")
    if total != height * width:
        raise UserError(f"{where} has RLE counts covering {total} pixels, but its size {list(size)} has "
                        f"{height * width}")


def check_mask_fits_image(segm: list | dict, where: str, image: dict) -> None:
    """A well-formed mask against its COCO image entry: an RLE must have the image's size; polygon points
    may lie at most one image side outside the image (pycocotools rasterises the whole outline, so
    far-away points cost memory without bound)."""
    width, height = image["width"], image["height"]
    image_name = f" (id {image['id']!r})" if "id" in image else ""
    if isinstance(segm, dict):
        if list(segm["size"]) != [height, width]:
            raise UserError(f"{where} has an RLE of size {list(segm['size'])} (h, w) but its image{image_name} is "
                            f"{height}x{width} (h x w)")
        return
    for p in segm:
        xs, ys = p[0::2], p[1::2]
        if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
            raise UserError(f"{where} has a polygon point far outside its {width}x{height} (w x h) image{image_name} "
                            f"(x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, {max(ys):g}])")


def rle_counts_total(counts: str | bytes) -> int | None:
    """The number of pixels a compressed RLE string covers, read as pycocotools' `rleFrString` reads it
    (runs of 5-bit characters from '0', sign bit on the last one, runs from the third on stored as a
    difference to the run two before, each kept as an unsigned 32-bit int); None if it is malformed
    (a character outside '0'..'o', a run cut short at the end, a run pycocotools would overflow).
    """
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            return None
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return 0
    if chars.min() < 0 or chars.max() > 63:
        return None
    more = (chars & 0x20) != 0
    if more[-1]:
        return None
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_RLE_RUN_CHARS:
        return None
    shift = 5 * (np.arange(chars.size) - np.repeat(starts, lengths))
    runs = np.add.reduceat((chars & 0x1f) << shift, starts)
    runs -= np.where(chars[ends] & 0x10, 1 << (5 * lengths), 0)  # sign extension
    values = runs.copy()
    values[1::2] = np.cumsum(runs[1::2])  # run i = stored i + run i-2, for i > 2 (so chains start at 1 and 2)
    values[2::2] = np.cumsum(runs[2::2])
    return int((values & 0xFFFFFFFF).sum())


def check_annotation_ids(annotations: list[dict], source: str) -> None:
    """Annotation ids, where given, must be unique (pycocotools indexes annotations by id)."""
    first_index: dict[Any, int] = {}
    for i, ann in enumerate(annotations):
        if "id" not in ann:
            continue
        ann_id = ann["id"]
        if not isinstance(ann_id, (int, str)) or isinstance(ann_id, bool):
            raise UserError(f"{source}: annotation #{i} has an 'id' {_describe(ann_id)} that is neither an "
                            f"integer nor a string")
        if ann_id in first_index:
            raise UserError(f"{source}: annotations #{first_index[ann_id]} and #{i} have the same id {ann_id!r}")
        first_index[ann_id] = i


def require_gt_fields(annotations: list[dict], iou_types: tuple[str, ...] | list[str], source: str) -> None:
    """What pycocotools' evaluation reads from every ground-truth object (crowd regions included), where it
    would raise a bare KeyError: `id`, `area`, `iscrowd`, a mask for mask AP (`segm`), a box for box AP."""
    needed = [("id", "pycocotools indexes objects by id"), ("area", "the area ranges need it"),
              ("iscrowd", "pycocotools needs it (0 or 1)")]
    needed += [(key, f"{kind} AP needs it") for key, kind, iou_type in
               (("segmentation", "mask", "segm"), ("bbox", "box", "bbox")) if iou_type in iou_types]
    for i, ann in enumerate(annotations):
        for key, reason in needed:
            if key not in ann:
                raise UserError(f"{source}: annotation #{i} (image_id {ann.get('image_id')!r}) has no '{key}'; "
                                f"{reason} for every ground-truth object")
