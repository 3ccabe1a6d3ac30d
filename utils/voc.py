"""PASCAL VOC: class names, image ids, XML boxes, and SegmentationObject/Class PNGs -> COCO instances.

Category ids follow the VOC label PNGs: 1 = aeroplane ... 20 = tvmonitor (0 is background and
255 is void), so a `category_id` is the pixel value of its class in `SegmentationClass`.
Image ids are the image name without its underscore (`2011_000003` -> 2011000003), as in LOST.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import numpy as np

from utils import label_png
from utils.coco_io import OBJECT_CATEGORY, make_annotation, read_text_lines
from utils.errors import UserError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# Names by label-PNG pixel value (0 = background), as semantic segmentation reports them.
VOC_SEGMENTATION_CLASSES = ("background",) + VOC_CLASSES
VOC_NAME_TO_ID = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
VOC_CATEGORIES = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(VOC_CLASSES)]
VOID = label_png.IGNORE_INDEX  # void / object boundary in VOC label PNGs


def voc_image_id(name: str) -> int:
    """`2011_000003` (or `2011_000003.jpg`) -> 2011000003; names that are not digits raise UserError."""
    stem = Path(name).stem
    digits = stem.replace("_", "")
    if not digits.isdigit():
        raise UserError(f"VOC image name {name!r} is not of the form YYYY_NNNNNN; cannot derive an image id")
    return int(digits)


def read_image_set(voc_root: str | os.PathLike, subdir: str, image_set: str) -> list[str]:
    """Image names listed in `ImageSets/<subdir>/<image_set>.txt` (a path to a .txt file also works).

    A name listed twice is an error (it would count the image twice). Names that are not UTF-8 come back
    as lone surrogates, naming the same files (`utils.coco_io.read_text_lines`).
    """
    path = Path(image_set)
    if not path.is_file():
        path = Path(voc_root) / "ImageSets" / subdir / f"{image_set}.txt"
    if not path.is_file():
        raise UserError(f"image set not found: {path}")
    names = [line.split()[0] for line in read_text_lines(path, "image set")]
    if not names:
        raise UserError(f"image set {path} is empty")
    first_line: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in first_line:
            raise UserError(f"image set {path}: {name!r} is listed twice (entries {first_line[name]} and {number}); "
                            f"remove the duplicate (e.g. sort -u)")
        first_line[name] = number
    return names


# ----------------------------------------------------------------------------- XML boxes


class VocObject(NamedTuple):
    name: str
    box_xyxy: tuple[float, float, float, float]  # pixel edges: xmin - 1, ymin - 1, xmax, ymax
    difficult: bool
    truncated: bool


class VocAnnotation(NamedTuple):
    filename: str
    width: int
    height: int
    objects: list[VocObject]


def parse_voc_xml(path: str | os.PathLike) -> VocAnnotation:
    """Read a VOC `Annotations/*.xml`.

    VOC boxes are 1-based inclusive pixel indices; like LOST we subtract 1 from xmin/ymin so that
    the box is in pixel-edge coordinates (the whole image is 0, 0, W, H), the convention of COCO bboxes.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise UserError(f"VOC annotation not found: {path}") from None
    except ET.ParseError as exc:
        raise UserError(f"VOC annotation {path} is not valid XML: {exc}") from None

    def text(node: ET.Element, tag: str, default: str | None = None) -> str:
        child = node.find(tag)
        if child is None or child.text is None:
            if default is not None:
                return default
            raise UserError(f"VOC annotation {path}: missing <{tag}>")
        return child.text.strip()

    try:
        size = root.find("size")
        width = int(float(text(size, "width"))) if size is not None else 0
        height = int(float(text(size, "height"))) if size is not None else 0
        objects = []
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            if box is None:
                raise UserError(f"VOC annotation {path}: an <object> has no <bndbox>")
            xmin, ymin, xmax, ymax = (float(text(box, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append(VocObject(
                name=text(obj, "name"),
                box_xyxy=(xmin - 1.0, ymin - 1.0, xmax, ymax),
                difficult=text(obj, "difficult", "0") == "1",
                truncated=text(obj, "truncated", "0") == "1",
            ))
    except ValueError as exc:
        raise UserError(f"VOC annotation {path}: bad number ({exc})") from None
    return VocAnnotation(text(root, "filename", path.stem + ".jpg"), width, height, objects)


# ----------------------------------------------------------------------------- PNG -> COCO


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A VOC SegmentationObject/Class PNG as its raw index values, HxW uint8 (palette or grayscale only:
    an RGB rendering or a 1-bit image is refused rather than guessed at)."""
    return label_png.read_label_png(path, index_only=True)


def instances_from_pngs(objects: np.ndarray, classes: np.ndarray) -> tuple[list[tuple[int, np.ndarray, int]], list[int]]:
    """Split a SegmentationObject map into (instance id, mask, class) triples.

    255 (void / boundary) belongs to no instance; instance ids may skip numbers. The class of an
    instance is the majority of its pixels in the SegmentationClass map, ignoring 255 and 0.
    Returns the instances and the ids of instances without any object-class pixel (skipped).
    """
    instances, unclassed = [], []
    for inst_id in np.unique(objects):
        if inst_id in (0, VOID):
            continue
        mask = objects == inst_id
        votes = np.bincount(classes[mask], minlength=256)
        votes[[0, VOID]] = 0
        if votes.sum() == 0:
            unclassed.append(int(inst_id))
            continue
        instances.append((int(inst_id), mask.astype(np.uint8), int(np.argmax(votes))))
    return instances, unclassed


def convert_voc_instances(voc_root: str | os.PathLike, image_set: str = "trainval", mask_format: str = "rle",
                          class_agnostic: bool = False, progress: bool | None = None) -> dict:
    """VOC `SegmentationObject` + `SegmentationClass` PNGs -> a COCO instances dict.

    `image_set` names `ImageSets/Segmentation/<image_set>.txt` (or is a path to a list), or is `all`
    for every PNG in `SegmentationObject`. `file_name` is relative to the VOCdevkit folder
    (`VOC2012/JPEGImages/2011_000003.jpg`), like gen_masks.py's VOC output.
    """
    from utils.progress import Progress

    root = Path(voc_root)
    obj_dir, cls_dir = root / "SegmentationObject", root / "SegmentationClass"
    for folder in (obj_dir, cls_dir):
        if not folder.is_dir():
            raise UserError(f"{folder} not found; --voc_root must be a VOC20XX folder with SegmentationObject/ "
                            "and SegmentationClass/")
    if image_set == "all":
        names = sorted(p.stem for p in obj_dir.glob("*.png"))
        if not names:
            raise UserError(f"no PNGs in {obj_dir}")
    else:
        names = read_image_set(root, "Segmentation", image_set)
    image_ids = [voc_image_id(name) for name in names]  # every name checked before any work
    name_of: dict[int, str] = {}
    for name, image_id in zip(names, image_ids):
        if image_id in name_of:
            raise UserError(f"images {name_of[image_id]!r} and {name!r} would both get image id {image_id}")
        name_of[image_id] = name

    images, annotations = [], []
    for name, image_id in Progress(zip(names, image_ids), total=len(names), desc="convert", unit="img",
                                   enabled=progress is not False):
        objects = read_label_png(obj_dir / f"{name}.png")
        classes = read_label_png(cls_dir / f"{name}.png")
        if objects.shape != classes.shape:
            raise UserError(f"{name}: SegmentationObject is {objects.shape[1]}x{objects.shape[0]} but "
                            f"SegmentationClass is {classes.shape[1]}x{classes.shape[0]}")
        bad = np.setdiff1d(np.unique(classes), list(range(len(VOC_CLASSES) + 1)) + [VOID])
        if bad.size:
            raise UserError(f"{cls_dir / (name + '.png')}: class value {int(bad[0])} is not a VOC class (0-20 or 255)")
        height, width = objects.shape
        images.append({"id": image_id, "file_name": f"{root.resolve().name}/JPEGImages/{name}.jpg", "width": width, "height": height})
        instances, unclassed = instances_from_pngs(objects, classes)
        for inst_id in unclassed:
            print(f"warning: {name!r}: instance {inst_id} has no object-class pixels; skipped")
        for _, mask, cls in instances:
            ann = make_annotation(mask, image_id, 1 if class_agnostic else cls, score=1.0,
                                  mask_format=mask_format, ann_id=len(annotations) + 1)
            ann.pop("score")
            if mask_format == "polygon" and not ann["segmentation"]:
                # Too thin for a 3-point contour: keep it exactly as RLE rather than dropping it.
                ann = make_annotation(mask, image_id, ann["category_id"], mask_format="rle", ann_id=ann["id"])
                ann.pop("score")
            annotations.append(ann)
    categories = [OBJECT_CATEGORY] if class_agnostic else VOC_CATEGORIES
    return {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
