"""Broken COCO inputs are refused by the one loader (utils/coco_io.py -> utils/validate.py) with one line naming
the file, the entry and the culprit, before pycocotools sees them; table-driven over each kind of defect."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import eval_instances
from tests.cli_helpers import error_line, run_main
from utils.coco_io import load_coco_dataset, load_predictions, mask_to_rle
from utils.errors import UserError
from utils.validate import rle_counts_total


def _square(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _dataset():
    """Two 10x12 (h x w) images; a polygon object, an RLE object and an uncompressed-RLE crowd region."""
    rle = mask_to_rle(_square(10, 12, 2, 6, 3, 9))
    crowd = {"size": [10, 12], "counts": [30, 4, 86]}  # column-major runs: 30 off, 4 on, 86 off
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 12},
                   {"id": 2, "file_name": "b.jpg", "height": 10, "width": 12}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 8, 1, 8, 7, 1, 7]],
             "bbox": [1, 1, 7, 6], "area": 42, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": rle, "bbox": [3, 2, 6, 4], "area": 24,
             "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "segmentation": crowd, "bbox": [3, 0, 1, 4], "area": 4,
             "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "object"}],
    }


def test_the_hand_made_dataset_is_valid(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_dataset()))
    assert load_coco_dataset(path) == _dataset()
    crowd = _dataset()["annotations"][2]["segmentation"]
    assert mask_utils.area(mask_utils.frPyObjects(crowd, 10, 12)) == 4


@pytest.mark.parametrize("corrupt, message", [
    # images
    (lambda d: d["images"][1].update(id=1), "images[0] and images[1] have the same id 1"),
    (lambda d: d["images"][1].update(id="2"), "images[1] has id '2', but images[0] has id 1: image ids must be all"),
    (lambda d: d["images"][0].pop("width"), "images[0] has no 'width'"),
    (lambda d: d["images"][0].update(height=0), "images[0] (id 1) has 'height' 0; expected a positive integer"),
    (lambda d: d["images"][0].update(height=float("nan")), "images[0] (id 1) has 'height' nan; expected a positive"),
    # boxes, areas, ids
    (lambda d: d["annotations"][0].update(bbox=[1, 1, float("nan"), 6]),
     "annotation #0 has a 'bbox' [1, 1, nan, 6] with a non-finite value"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 7, -6]),
     "annotation #0 has a 'bbox' [1, 1, 7, -6] with a negative width or height"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 7]), "annotation #0 has a malformed 'bbox' [1, 1, 7]"),
    (lambda d: d["annotations"][0].update(area=float("inf")), "annotation #0 has an 'area' inf; expected a finite"),
    (lambda d: d["annotations"][2].update(id=1), "annotations #0 and #2 have the same id 1"),
    (lambda d: d["annotations"][0].update(image_id=7), "annotations[0] refers to image_id 7 not in 'images'"),
    # polygons
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, float("nan"), 8, 7]]),
     "annotation #0 has a polygon with a non-finite or huge coordinate nan"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, 1, float("inf"), 7]]),
     "annotation #0 has a polygon with a non-finite or huge coordinate inf"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, "x", 8, 7]]),
     "annotation #0 has a polygon with a non-numeric coordinate 'x'"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, 1, 8, 1e8]]),
     "annotation #0 has a polygon point far outside its 12x10 (w x h) image (id 1)"),
    (lambda d: d["annotations"][0].update(segmentation=[]), "annotation #0 has an empty polygon list"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, 1]]), "annotation #0 has a malformed polygon"),
    # compressed RLE
    (lambda d: d["annotations"][1]["segmentation"].update(counts="garbage!!"),
     "annotation #1 has RLE counts that are not a valid compressed RLE string ('garbage!!')"),
    (lambda d: d["annotations"][1]["segmentation"].update(counts=""),
     "annotation #1 has RLE counts covering 0 pixels, but its size [10, 12] has 120"),
    (lambda d: d["annotations"][1]["segmentation"].update(counts="ZZ"),  # a run cut short at the end
     "annotation #1 has RLE counts that are not a valid compressed RLE string ('ZZ')"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[12, 10]),
     "annotation #1 has an RLE of size [12, 10] (h, w) but its image (id 2) is 10x12 (h x w)"),
    (lambda d: d["annotations"][1]["segmentation"].update(size=[10]), "annotation #1 has an RLE 'size' [10]"),
    (lambda d: d["annotations"][1]["segmentation"].pop("counts"), "annotation #1 has an RLE without 'counts'/'size'"),
    # uncompressed RLE
    (lambda d: d["annotations"][2]["segmentation"].update(counts=[30, 4, 80]),
     "annotation #2 has RLE counts covering 114 pixels, but its size [10, 12] has 120"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts=[30, -4, 94]),
     "annotation #2 has uncompressed RLE counts that are not all non-negative integers"),
    (lambda d: d["annotations"][2].update(score=float("nan")), "annotation #2 has a non-finite 'score' nan"),
])
def test_broken_dataset_entries_are_named(tmp_path, corrupt, message):
    data = _dataset()
    corrupt(data)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as caught:
        load_coco_dataset(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_predictions_are_checked_against_their_own_images(tmp_path):
    """A full COCO dict of predictions (gen_masks' output) is checked against its own images at load."""
    data = _dataset()
    data["annotations"][1]["segmentation"] = mask_to_rle(_square(5, 5, 1, 3, 1, 3))  # valid, the wrong size
    path = tmp_path / "masks.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"masks\.json: annotation #1 has an RLE of size \[5, 5\] \(h, w\) but its "
                                        r"image \(id 2\) is 10x12"):
        load_predictions(path)
    path.write_text(json.dumps(data["annotations"]))  # as a results list its size is checked against the GT later
    assert load_predictions(path)[1] is None


def test_rle_counts_total_reads_strings_as_pycocotools_does():
    rng = np.random.default_rng(0)
    for i in range(200):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if i % 4 == 0:
            mask[:] = i % 8 == 0  # all off, all on
        counts = mask_to_rle(mask)["counts"]
        assert rle_counts_total(counts) == h * w == rle_counts_total(counts.encode())
    # Hand-read strings: '1' '2' are runs 1 and 2; 'PPYo1' is one run of 5 characters, 9 * 32**2 + 31 * 32**3
    # + 32**4 = 2073600 (1440 x 1440, all off); 'O' is -1, stored as 2**32 - 1. Characters outside '0'..'o', a
    # run cut short ('ZZ') and a run of 7 characters are malformed.
    for counts, total in [("", 0), ("0", 0), ("1", 1), ("12", 3), ("PPYo1", 2073600), ("11O1", 1 + 1 + 2**32 - 1 + 2),
                          ("garbage!!", None), ("é", None), ("ZZ", None), ("aaaaaaa0", None)]:
        assert rle_counts_total(counts) == total, counts
    assert mask_utils.decode({"size": [1, 3], "counts": b"12"}).ravel().tolist() == [0, 1, 1]
    assert mask_utils.decode({"size": [1440, 1440], "counts": b"PPYo1"}).sum() == 0


@pytest.mark.parametrize("corrupt, message", [
    # Each of these used to reach pycocotools: a memory blow-up or segfault, a KeyError, or a silently lower AP.
    (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 8, float("nan"), 8, 7]]),
     "annotation #0 has a polygon with a non-finite or huge coordinate nan"),
    (lambda d: d["annotations"][0].pop("segmentation"),
     "annotation #0 (image_id 1) has no 'segmentation'; mask AP needs it for every ground-truth object"),
    (lambda d: d["annotations"][0].pop("iscrowd"), "annotation #0 (image_id 1) has no 'iscrowd'"),
    (lambda d: d["images"].append(dict(d["images"][0])), "images[0] and images[2] have the same id 1"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, float("nan"), 6]),
     "annotation #0 has a 'bbox' [1, 1, nan, 6] with a non-finite value"),
    (lambda d: d["annotations"][1]["segmentation"].update(counts="garbage!!"),
     "annotation #1 has RLE counts that are not a valid compressed RLE string"),
])
def test_eval_instances_refuses_broken_ground_truth(tmp_path, corrupt, message):
    data = _dataset()
    preds = [dict(a, score=1.0) for a in copy.deepcopy(data["annotations"][:2])]
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    argv = ["--input_file", str(tmp_path / "preds.json"), "--gt_file", str(tmp_path / "gt.json"), "--class_agnostic"]
    (tmp_path / "gt.json").write_text(json.dumps(data))
    code, stdout, stderr = run_main(eval_instances.main, argv)
    assert code == 0 and stdout.strip().splitlines()[-1] == "segm AP50: 100.00", stderr
    corrupt(data)
    (tmp_path / "gt.json").write_text(json.dumps(data))
    code, stdout, stderr = run_main(eval_instances.main, argv)
    assert code == 2 and stdout == ""
    assert error_line(stderr).startswith(f"error: {tmp_path / 'gt.json'}: {message}")


# ----------------------------------------------------------------------------- category ids (point 11)


def _ten_objects():
    """Ten 10x12 images with one square object of category 1 each, and perfect predictions of them."""
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 12} for i in range(1, 11)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "segmentation": mask_to_rle(_square(10, 12, 2, 6, 3, 3 + i % 6 + 2)),
             "area": 4 * (i % 6 + 2), "bbox": [3, 2, i % 6 + 2, 4], "iscrowd": 0} for i in range(1, 11)]
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    preds = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
             for a in anns]
    return gt, preds


def _evaluate(tmp_path, gt, preds, *flags):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    return run_main(eval_instances.main, ["--input_file", str(tmp_path / "preds.json"), "--gt_file",
                                          str(tmp_path / "gt.json"), *flags])


def test_perfect_predictions_score_100(tmp_path):
    gt, preds = _ten_objects()
    code, stdout, stderr = _evaluate(tmp_path, gt, preds)
    assert code == 0 and stdout.strip().splitlines()[-1] == "segm AP50: 100.00", stderr


def test_predictions_of_categories_the_gt_lacks_are_refused(tmp_path):
    """3 of 10 perfect predictions carry id 7, which the GT does not define: pycocotools drops them and the AP
    read 70 (a note on stdout said so); now one error line with the ids and counts."""
    gt, preds = _ten_objects()
    for pred in preds[:3]:
        pred["category_id"] = 7
    preds[3]["category_id"] = 0
    code, stdout, stderr = _evaluate(tmp_path, gt, preds)
    assert code == 2 and stdout == ""
    assert error_line(stderr) == (
        f"error: {tmp_path / 'preds.json'}: 4 of 10 predictions have category ids that are not among the GT "
        f"categories (1, 2): 0 (1x), 7 (3x); pycocotools would silently ignore them; map the predicted ids to the "
        f"GT's, or pass --class_agnostic to ignore categories")
    code, stdout, _ = _evaluate(tmp_path, gt, preds, "--class_agnostic")  # categories folded: all count
    assert code == 0 and stdout.strip().splitlines()[-1] == "segm AP50: 100.00"


def test_gt_objects_of_categories_the_gt_lacks_are_refused(tmp_path):
    """GT objects of an undefined category were silently left out of the evaluation."""
    gt, preds = _ten_objects()
    gt["annotations"][0]["category_id"] = 5
    del gt["annotations"][1]["category_id"]
    code, stdout, stderr = _evaluate(tmp_path, gt, preds)
    assert code == 2 and stdout == ""
    assert error_line(stderr) == (
        f"error: {tmp_path / 'gt.json'}: 2 of 10 annotations have category ids that are not among the GT categories "
        f"(1, 2): 5 (1x), None (1x); pycocotools would silently ignore them; add their categories to 'categories', "
        f"or correct the ids")
    # With --eval_classes the GT's categories select its objects, also when folded; without, they do not count.
    assert _evaluate(tmp_path, gt, preds, "--class_agnostic", "--eval_classes", "1")[0] == 2
    code, stdout, _ = _evaluate(tmp_path, gt, preds, "--class_agnostic")
    assert code == 0 and stdout.strip().splitlines()[-1] == "segm AP50: 100.00"
