"""convert_voc.py: VOC SegmentationObject/Class PNGs -> COCO instances, checked pixel for pixel."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import convert_voc
from tests.cli_helpers import error_line, run_main
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
    code, _, stderr = run_main(convert_voc.main, ["--voc_root", str(voc), "--image_set", "trainval",
                                                  "--out_file", str(out)])
    assert code == 0, stderr
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
    code, _, stderr = run_main(convert_voc.main, ["--voc_root", str(root), "--image_set", "all",
                                                  "--out_file", str(out)])
    assert code == 2
    assert "2007_000002.png" in error_line(stderr)
    assert not out.exists()  # no half-written output
    with pytest.raises(UserError, match="image set not found"):
        convert_voc_instances(root, "missing")


def _tiny_voc(tmp_path, names):
    root = tmp_path / "VOC2012"
    for sub in ("SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    objects = np.zeros((6, 8), dtype=np.uint8)
    objects[1:4, 1:5] = 1
    for name in names:
        _palette_png(root / "SegmentationObject" / f"{name}.png", objects)
        _palette_png(root / "SegmentationClass" / f"{name}.png", objects * 12)
    return root


def test_duplicate_name_in_the_image_list_is_an_error(tmp_path):
    root = _tiny_voc(tmp_path, ["2007_000001", "2007_000002"])
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n\n2007_000001\n")
    out = tmp_path / "out.json"
    code, stdout, stderr = run_main(convert_voc.main, ["--voc_root", str(root), "--image_set", "val",
                                                       "--out_file", str(out)])
    assert code == 2 and not out.exists()
    assert error_line(stderr) == (f"error: image set {root / 'ImageSets/Segmentation/val.txt'}: '2007_000001' is "
                                  f"listed twice (entries 1 and 3); remove the duplicate (e.g. sort -u)")
    # Two spellings of one image id are refused too, rather than written as duplicate image ids.
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007000001\n")
    (root / "SegmentationObject/2007000001.png").write_bytes((root / "SegmentationObject/2007_000001.png").read_bytes())
    with pytest.raises(UserError, match="'2007_000001' and '2007000001' would both get image id 2007000001"):
        convert_voc_instances(root, "val")


def test_non_utf8_name_in_the_image_list_is_one_error_line(tmp_path):
    root = _tiny_voc(tmp_path, ["2007_000001"])
    (root / "ImageSets/Segmentation/val.txt").write_bytes(b"2007_000001\n2007_00\xff0002\n")
    out = tmp_path / "out.json"
    code, stdout, stderr = run_main(convert_voc.main, ["--voc_root", str(root), "--image_set", "val",
                                                       "--out_file", str(out)])
    assert code == 2 and not out.exists() and stdout == ""
    assert error_line(stderr) == ("error: VOC image name '2007_00\\udcff0002' is not of the form YYYY_NNNNNN; "
                                  "cannot derive an image id")


def test_existing_output_is_kept_without_overwrite(tmp_path):
    root = _tiny_voc(tmp_path, ["2007_000001"])
    out = tmp_path / "out.json"
    out.write_text("old")
    argv = ["--voc_root", str(root), "--image_set", "all", "--out_file", str(out)]
    code, _, stderr = run_main(convert_voc.main, argv)
    assert code == 2 and "pass --overwrite" in error_line(stderr) and out.read_text() == "old"
    code, stdout, _ = run_main(convert_voc.main, argv + ["--overwrite"])
    assert code == 0 and stdout.strip() == f"wrote 1 instances in 1 images to {out}"
    assert [a["category_id"] for a in json.loads(out.read_text())["annotations"]] == [12]
