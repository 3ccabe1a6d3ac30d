"""Class splits for partial mask supervision: COCO's VOC / non-VOC split and seeded random A/B splits.

A class list file holds one category name per line (ids are accepted too); blank lines and
`#` comments are ignored. `read_class_list` maps such a file onto a dataset's category ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.coco_io import write_text
from utils.errors import UserError

# The 20 PASCAL VOC classes under their COCO names.
VOC_CLASSES_IN_COCO = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)


def voc_split(categories: list[dict], direction: str = "voc_to_nonvoc") -> tuple[list[int], list[int]]:
    """(A, B) category ids: `voc_to_nonvoc` trains masks on the 20 VOC classes, `nonvoc_to_voc` on the other 60."""
    voc = [c["id"] for c in categories if c["name"] in VOC_CLASSES_IN_COCO]
    other = [c["id"] for c in categories if c["name"] not in VOC_CLASSES_IN_COCO]
    if not voc:
        raise UserError("no VOC classes among the dataset's categories (are these COCO category names?)")
    if direction == "voc_to_nonvoc":
        return voc, other
    if direction == "nonvoc_to_voc":
        return other, voc
    raise UserError(f"split direction must be voc_to_nonvoc or nonvoc_to_voc, got {direction!r}")


def random_split(categories: list[dict], num_a: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random choice of `num_a` categories as set A; the rest are set B."""
    ids = sorted(c["id"] for c in categories)
    if not 0 < num_a < len(ids):
        raise UserError(f"set A must have between 1 and {len(ids) - 1} classes, got {num_a}")
    chosen = set(np.random.default_rng(seed).choice(ids, size=num_a, replace=False).tolist())
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]


def read_class_list(path: str | os.PathLike, categories: list[dict]) -> list[int]:
    """Category ids named (or numbered) in a class list file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class list not found: {path}")
    by_name = {c["name"]: c["id"] for c in categories}
    ids = {c["id"] for c in categories}
    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry in by_name:
            out.append(by_name[entry])
        elif entry.isdigit() and int(entry) in ids:
            out.append(int(entry))
        else:
            raise UserError(f"{path}:{line_no}: {entry!r} is not a category of the dataset")
    if not out:
        raise UserError(f"class list {path} names no classes")
    return sorted(set(out))


def write_class_list(path: str | os.PathLike, category_ids: list[int], categories: list[dict]) -> None:
    """One `id  # name` line per class: ids read back here and pass to `eval_instances.py --eval_classes`."""
    names = {c["id"]: c["name"] for c in categories}
    write_text(path, "".join(f"{i}  # {names[i]}\n" for i in category_ids))
