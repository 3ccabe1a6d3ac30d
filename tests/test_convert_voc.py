"""convert_voc.py: VOC SegmentationObject/Class PNGs -> COCO instances, checked pixel for pixel."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from utils.coco_io import decode_segmentation
from utils.errors import UserError
from utils.voc import VOC_CLASSES, convert_voc_instances, instances_from_pngs, read_label_png, voc_image_id


def _palette_png(path, array):
    img = Image.fromarray(array.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def test_voc_mini_masks_equal_pngs_pixel_for_pixel(voc_mini, tmp_path, repo_root):
    voc = voc_mini / "VOC2012"
    out = tmp_path / "gt.json"
    proc = subprocess.run([sys.executable, "convert_voc.py", "--voc_root", str(voc), "--image_set", "trainval",
                           "--out_file", str(out)], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    assert len(data["images"]) == 3

    total = 0
    for img in data["images"]:
        name = img["file_name"].split("/")[-1][:-4]
        assert img["file_name"] == f"VOC2012/JPEGImages/{name}.jpg"
        assert (voc_mini / img["file_name"]).is_file()
        assert img["id"] == voc_image_id(name)
        objects = np.array(Image.open(voc / "SegmentationObject" / f"{name}.png"))
        classes = np.array(Image.open(voc / "SegmentationClass" / f"{name}.png"))
        assert (img["height"], img["width"]) == objects.shape
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        ids = [i for i in np.unique(objects) if i not in (0, 255)]
        assert len(anns) == len(ids)
        union = np.zeros(objects.shape, dtype=np.int32)
        for ann, inst in zip(anns, ids):
            mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
            assert np.array_equal(mask.astype(bool), objects == inst)  # pixel for pixel
            votes = np.bincount(classes[objects == inst], minlength=256)
            votes[[0, 255]] = 0
            assert ann["category_id"] == int(np.argmax(votes))
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            union += mask
        assert union.max() <= 1
        assert not union[objects == 255].any()  # void pixels belong to no instance
        total += len(anns)
    assert total == 12 == len(data["annotations"])
    assert len({a["id"] for a in data["annotations"]}) == 12


def test_skipped_ids_void_and_majority_class(tmp_path):
    objects = np.zeros((20, 30), dtype=np.uint8)
    classes = np.zeros((20, 30), dtype=np.uint8)
    objects[2:8, 2:10] = 1
    classes[2:8, 2:10] = 15  # person
    classes[2:4, 2:4] = 5  # minority of another class inside instance 1
    objects[10:18, 5:25] = 7  # instance ids skip 2..6
    classes[10:18, 5:25] = 12
    objects[10, 5:25] = 255  # boundary row: void, belongs to no instance
    classes[10, 5:25] = 255
    objects[0, 29] = 3  # an instance whose only pixel is background in the class map: skipped
    instances, unclassed = instances_from_pngs(objects, classes)
    assert [(i, c) for i, _, c in instances] == [(1, 15), (7, 12)]
    assert unclassed == [3]
    assert instances[1][1].sum() == 7 * 20 and not instances[1][1][10].any()

    root = tmp_path / "VOC2012"
    for sub in ("SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    _palette_png(root / "SegmentationObject" / "2007_000001.png", objects)
    _palette_png(root / "SegmentationClass" / "2007_000001.png", classes)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    for fmt in ("rle", "polygon"):
        data = convert_voc_instances(root, "val", mask_format=fmt)
        assert [a["category_id"] for a in data["annotations"]] == [15, 12]
        masks = [decode_segmentation(a["segmentation"], 20, 30) for a in data["annotations"]]
        if fmt == "rle":
            assert np.array_equal(masks[0], objects == 1) and np.array_equal(masks[1], objects == 7)
        else:  # polygons approximate the outline
            assert abs(int(masks[0].sum()) - 48) <= 16
    agnostic = convert_voc_instances(root, "all", class_agnostic=True)
    assert {a["category_id"] for a in agnostic["annotations"]} == {1}
    assert agnostic["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]


def test_bad_inputs_give_clear_errors(tmp_path, repo_root):
    root = tmp_path / "VOC2012"
    for sub in ("SegmentationObject", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "SegmentationObject" / "2007_000002.png")
    _palette_png(root / "SegmentationClass" / "2007_000002.png", np.zeros((8, 8)))
    with pytest.raises(UserError, match="mode RGB"):
        read_label_png(root / "SegmentationObject" / "2007_000002.png")
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "convert_voc.py", "--voc_root", str(root), "--image_set", "all",
                           "--out_file", str(out)], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "2007_000002.png" in proc.stderr
    assert not out.exists()  # no half-written output
    with pytest.raises(UserError, match="image set not found"):
        convert_voc_instances(root, "missing")
