"""Class splits for partial mask supervision: COCO's VOC / non-VOC split and seeded random A/B splits.

`paper_random_splits` reproduces the MaskX R-CNN paper's 25 random splits (trials E1-E5 with
20, 30, 40, 50 or 60 classes in set A, its Figure 3) as its released code draws them.

A class list file holds one category name per line (ids are accepted too); blank lines and
`#` comments are ignored. `read_class_list` maps such a file onto a dataset's category ids.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils.coco_io import check_can_write, read_text_lines, write_text
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


PAPER_SPLIT_SIZES = (20, 30, 40, 50, 60)  # classes in set A
PAPER_SPLIT_TRIALS = 5  # E1..E5
PAPER_SPLIT_SEED = 3


def paper_random_splits(categories: list[dict]) -> dict[str, tuple[list[int], list[int]]]:
    """{"E1_A20B60": (A ids, B ids), ...} for trials E1-E5 x |A| in 20..60.

    Drawn as the paper's code does: one legacy NumPy RandomState(3); for each trial in order,
    for each size in order, a choice without replacement among the category positions (in id
    order). With COCO's 80 categories this gives the paper's splits.
    """
    ids = sorted(c["id"] for c in categories)
    if len(ids) <= max(PAPER_SPLIT_SIZES):
        raise UserError(f"the paper's random splits need more than {max(PAPER_SPLIT_SIZES)} categories "
                        f"(COCO has 80), the dataset has {len(ids)}")
    rng = np.random.RandomState(PAPER_SPLIT_SEED)
    splits = {}
    for trial in range(1, PAPER_SPLIT_TRIALS + 1):
        for size in PAPER_SPLIT_SIZES:
            chosen = set(rng.choice(len(ids), size, replace=False).tolist())
            splits[f"E{trial}_A{size}B{len(ids) - size}"] = (
                [i for k, i in enumerate(ids) if k in chosen], [i for k, i in enumerate(ids) if k not in chosen])
    return splits


def read_class_list(path: str | os.PathLike, categories: list[dict]) -> list[int]:
    """Category ids named (or numbered) in a class list file."""
    by_name = {c["name"]: c["id"] for c in categories}
    ids = {c["id"] for c in categories}
    out = []
    for line in read_text_lines(path, "class list"):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry in by_name:
            out.append(by_name[entry])
        elif entry.isdigit() and int(entry) in ids:
            out.append(int(entry))
        else:
            raise UserError(f"{path}: {entry!r} is not a category of the dataset")
    if not out:
        raise UserError(f"class list {path} names no classes")
    return sorted(set(out))


def write_class_list(path: str | os.PathLike, category_ids: list[int], categories: list[dict]) -> None:
    """One `id  # name` line per class: ids read back here and pass to `eval_instances.py --eval_classes`."""
    names = {c["id"]: c["name"] for c in categories}
    write_text(path, "".join(f"{i}  # {names[i]}\n" for i in category_ids))


SPLITS = ("voc_to_nonvoc", "nonvoc_to_voc", "random", "paper_random")


def write_splits(categories: list[dict], split: str, out_dir: str | os.PathLike, num_a: int = 40,
                 seed: int = 0, overwrite: bool = False) -> str:
    """Write OUT_DIR/A.txt and B.txt (`paper_random`: OUT_DIR/<split name>/A.txt, B.txt for each of
    the paper's splits); returns a one-line summary. Existing lists are kept (a UserError before anything
    is written) unless `overwrite`."""
    out = Path(out_dir)
    if split == "paper_random":
        splits = paper_random_splits(categories)
    elif split == "random":
        splits = {"": random_split(categories, num_a, seed)}
    elif split in SPLITS:
        splits = {"": voc_split(categories, split)}
    else:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for name in splits:
        for set_name in ("A.txt", "B.txt"):
            check_can_write(out / name / set_name, overwrite)
    for name, (set_a, set_b) in splits.items():
        write_class_list(out / name / "A.txt", set_a, categories)
        write_class_list(out / name / "B.txt", set_b, categories)
    if split == "paper_random":
        return f"wrote {len(splits)} splits ({', '.join(list(splits)[:2])}, ...) under {out}"
    set_a, set_b = splits[""]
    return f"set A: {len(set_a)} classes -> {out / 'A.txt'}; set B: {len(set_b)} classes -> {out / 'B.txt'}"
