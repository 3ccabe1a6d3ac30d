"""CorLoc by LOST's protocol on hand-made boxes (COCO JSON and VOC XML ground truth), one test per rule."""
from __future__ import annotations

import json

import numpy as np
import pytest

import eval_corloc
from tests.cli_helpers import error_line, run_main
from evaluation.coco_eval import EvalOptions, evaluate_instances
from utils.coco_io import make_annotation
from evaluation.corloc import evaluate_corloc, gt_from_coco, gt_from_voc
from utils.errors import UserError


def _coco_gt(tmp_path, boxes: dict, crowd: dict | None = None):
    """COCO GT with 100x100 images; `boxes` and `crowd` map image id -> list of [x, y, w, h]."""
    crowd = crowd or {}
    anns = []
    for iscrowd, table in ((0, boxes), (1, crowd)):
        for image_id, bs in table.items():
            for b in bs:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "bbox": b,
                             "area": b[2] * b[3], "iscrowd": iscrowd})
    ids = sorted(set(boxes) | set(crowd))
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in ids],
          "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _preds(tmp_path, preds, name="preds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(preds))
    return path


def test_most_confident_box_decides_and_every_gt_image_counts(tmp_path):
    gt = _coco_gt(tmp_path, {1: [[10, 10, 40, 40]], 2: [[0, 0, 50, 50]], 3: [[5, 5, 20, 20]],
                             4: [[60, 60, 30, 30], [0, 0, 10, 20]], 5: []})
    preds = _preds(tmp_path, [
        # image 1: IoU(10,10,40,40 | 14,10,40,40) = 36*40 / (2*1600 - 1440) = 0.818 -> correct
        {"image_id": 1, "category_id": 1, "bbox": [14, 10, 40, 40], "score": 0.9},
        # image 2: the most confident box misses (IoU 0.25); a better but less confident one does not count
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 25, 25], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.7},
        # image 3: no prediction -> miss
        # image 4: IoU exactly 0.5 with its second GT box ([0,0,10,20] vs [0,0,10,10]) -> correct
        {"image_id": 4, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.6},
        {"image_id": 4, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.1},
        # image 5 has no GT box: a miss (LOST counts every image of the dataset)
        {"image_id": 5, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.6},
    ])
    result = evaluate_corloc(preds, gt_file=str(gt))
    assert result.per_image == {1: True, 2: False, 3: False, 4: True, 5: False}
    assert result.corloc == pytest.approx(40.0)
    assert (result.num_images, result.num_gt_images, result.num_without_prediction, result.num_without_gt,
            result.num_skipped) == (5, 5, 1, 1, 0)
    # --no_hard skips the image without a GT box: 2 of 4.
    hard = evaluate_corloc(preds, gt_file=str(gt), no_hard=True)
    assert hard.per_image == {1: True, 2: False, 3: False, 4: True}
    assert (hard.corloc, hard.num_images, hard.num_gt_images, hard.num_skipped) == (50.0, 4, 5, 1)


def test_coco_crowd_boxes_are_never_gt_and_crowd_only_images_are_misses(tmp_path):
    # image 1: a normal box; image 2: only a crowd region, which the prediction matches exactly.
    gt = _coco_gt(tmp_path, {1: [[0, 0, 40, 40]]}, crowd={2: [[10, 10, 50, 50]], 1: [[50, 50, 40, 40]]})
    preds = _preds(tmp_path, [{"image_id": 1, "bbox": [50, 50, 40, 40], "score": 1.0},  # hits only the crowd box
                              {"image_id": 2, "bbox": [10, 10, 50, 50], "score": 1.0}])
    result = evaluate_corloc(preds, gt_file=str(gt))
    assert result.per_image == {1: False, 2: False}
    assert (result.num_images, result.num_without_gt, result.num_skipped) == (2, 1, 0)
    assert "crowd regions" in result.summary()
    hard = evaluate_corloc(preds, gt_file=str(gt), no_hard=True)  # crowd-only image 2 is skipped
    assert hard.per_image == {1: False} and (hard.num_images, hard.num_skipped) == (1, 1)
    assert gt_from_coco(gt).boxes[2].shape == (0, 4)


def test_coco_gt_corners_are_rounded_like_lost(tmp_path):
    # GT [0.4, 0, 10.2, 10]: corners x 0.4 -> 0 and 10.6 -> 11, so the box is [0, 0, 11, 10]. The prediction
    # [0, 0, 5.5, 10] then has IoU 55 / 110 = 0.5 (correct); against the unrounded box it would be 51 / 106.
    # Halves round to even, like Python's round: [0.5, 1.5, 2.0, 1.0] -> corners 0, 2, 2 (2.5), 2 (2.5).
    gt = _coco_gt(tmp_path, {1: [[0.4, 0, 10.2, 10]], 2: [[0.5, 1.5, 2.0, 1.0]]})
    boxes = gt_from_coco(gt).boxes
    assert boxes[1].tolist() == [[0.0, 0.0, 11.0, 10.0]]
    assert boxes[2].tolist() == [[0.0, 2.0, 2.0, 0.0]]
    preds = _preds(tmp_path, [{"image_id": 1, "bbox": [0, 0, 5.5, 10], "score": 1.0}])
    assert evaluate_corloc(preds, gt_file=str(gt)).per_image == {1: True, 2: False}


def test_mask_without_bbox_uses_its_tight_box(tmp_path):
    gt = _coco_gt(tmp_path, {1: [[5, 5, 20, 20]]})
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[5:25, 5:25] = 1
    ann = make_annotation(mask, 1, score=0.5)
    del ann["bbox"]
    assert evaluate_corloc(_preds(tmp_path, [ann]), gt_file=str(gt)).per_image == {1: True}


def _xml(name, objects):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><truncated>{int(t)}</truncated><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d, t in objects)
    return f"<annotation><filename>{name}.jpg</filename><size><width>100</width><height>80</height></size>{objs}</annotation>"


def _voc(tmp_path, images: dict):
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for name, objects in images.items():
        (root / "Annotations" / f"{name}.xml").write_text(_xml(name, objects))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{n}\n" for n in images))
    return root


def test_voc_counts_difficult_and_truncated_boxes_unless_no_hard(tmp_path):
    # VOC boxes are 1-based inclusive: xmin=1..xmax=20 is [0, 20) in pixel edges.
    root = _voc(tmp_path, {
        "2007_000001": [("dog", (1, 1, 20, 20), False, False)],
        "2007_000002": [("cat", (51, 41, 100, 80), True, False), ("cat", (1, 1, 10, 10), False, False)],
        "2007_000003": [("cat", (1, 1, 50, 50), False, True)],  # only a truncated object
        "2007_000004": [("cow", (1, 1, 30, 30), True, False)],  # only a difficult object
    })
    preds = _preds(tmp_path, [
        {"image_id": 2007000001, "bbox": [0, 0, 20, 20], "score": 1.0},  # IoU 1 thanks to the -1 shift
        {"image_id": 2007000002, "bbox": [50, 40, 50, 40], "score": 1.0},  # hits only the difficult box
        {"image_id": 2007000003, "bbox": [0, 0, 50, 50], "score": 1.0},  # hits the truncated box
        {"image_id": 2007000004, "bbox": [0, 0, 30, 30], "score": 1.0},  # hits the difficult box
    ])
    every_box = evaluate_corloc(preds, voc_root=str(root))
    assert every_box.per_image == dict.fromkeys(("2007_000001", "2007_000002", "2007_000003", "2007_000004"), True)
    assert (every_box.num_images, every_box.num_skipped) == (4, 0)
    no_hard = evaluate_corloc(preds, voc_root=str(root), no_hard=True)
    # Images 3 and 4 are left without a box and skipped; image 2 keeps only its easy box, which is missed.
    assert no_hard.per_image == {"2007_000001": True, "2007_000002": False}
    assert (no_hard.corloc, no_hard.num_images, no_hard.num_gt_images, no_hard.num_skipped) == (50.0, 2, 4, 2)
    assert gt_from_voc(root, "trainval").boxes["2007_000001"].tolist() == [[0.0, 0.0, 20.0, 20.0]]

    only_hard = _voc(tmp_path / "b", {"2007_000004": [("cow", (1, 1, 30, 30), True, False)]})
    with pytest.raises(UserError, match="no image .* is left to count .*1 skipped"):
        evaluate_corloc(_preds(tmp_path, [], "none.json"), voc_root=str(only_hard), no_hard=True)
    with pytest.raises(UserError, match="exactly one"):
        evaluate_corloc(preds)
    with pytest.raises(UserError, match="--iou_threshold 1.5"):
        evaluate_corloc(preds, voc_root=str(root), iou_threshold=1.5)


def test_voc_image_list_with_a_duplicate_is_refused(tmp_path):
    root = _voc(tmp_path, {"2007_000001": [("dog", (1, 1, 20, 20), False, False)]})
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("2007_000001\n2007_000001\n")
    with pytest.raises(UserError, match="'2007_000001' is listed twice"):
        gt_from_voc(root, "trainval")


def test_cli_reports_the_denominator_and_refuses_to_overwrite(tmp_path):
    gt = _coco_gt(tmp_path, {1: [[10, 10, 40, 40]], 2: [], 3: [[0, 0, 5, 5]]}, crowd={2: [[0, 0, 9, 9]]})
    preds = _preds(tmp_path, [{"image_id": 1, "bbox": [10, 10, 40, 40], "score": 1.0}])
    out = tmp_path / "corloc.json"
    code, stdout, stderr = run_main(eval_corloc.main, ["--input_file", str(preds), "--gt_file", str(gt),
                                                       "--out_json", str(out)])
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[-1] == "CorLoc: 33.33"
    assert lines[-2] == ("3 of 3 ground-truth images counted; 1 correctly localised; misses include 1 without a "
                         "prediction and 1 without a GT box (crowd regions are not GT boxes)")
    saved = json.loads(out.read_text())
    assert (saved["num_images"], saved["num_gt_images"], saved["num_skipped"], saved["num_without_gt"]) == (3, 3, 0, 1)
    assert saved["per_image"] == {"1": True, "2": False, "3": False}

    code, stdout, stderr = run_main(eval_corloc.main, ["--input_file", str(preds), "--gt_file", str(gt),
                                                       "--out_json", str(out), "--no_hard"])
    assert code == 2 and "already exists; pass --overwrite" in error_line(stderr) and stdout == ""
    code, stdout, _ = run_main(eval_corloc.main, ["--input_file", str(preds), "--gt_file", str(gt),
                                                  "--out_json", str(out), "--no_hard", "--overwrite"])
    assert code == 0 and stdout.strip().splitlines()[-1] == "CorLoc: 50.00"
    assert "1 skipped (no GT box left after --no_hard)" in stdout
    assert json.loads(out.read_text())["num_skipped"] == 1


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p[0].update(score=float("nan")), "annotation #0 has a non-finite 'score' nan"),
    (lambda p: p[1].update(bbox=[float("nan"), 0, 5, 5]),
     "annotation #1 has a 'bbox' [nan, 0, 5, 5] with a non-finite value"),
    (lambda p: p[1].update(bbox=[0, 0, -5, 5]),
     "annotation #1 has a 'bbox' [0, 0, -5, 5] with a negative width or height"),
    (lambda p: p[1].update(segmentation=[[0, 0, 10, float("nan"), 10, 10]]),
     "annotation #1 has a polygon with a non-finite or huge coordinate nan"),
])
def test_bad_predictions_are_refused_like_eval_instances(tmp_path, corrupt, message):
    """The same loader checks CorLoc's and eval_instances' inputs: same file, same message."""
    gt = _coco_gt(tmp_path, {1: [[10, 10, 40, 40]], 2: [[0, 0, 50, 50]]})
    preds = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 1.0,
              "segmentation": [[10, 10, 50, 10, 50, 50]]},
             {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.5,
              "segmentation": [[0, 0, 50, 0, 50, 50]]}]
    corrupt(preds)
    path = _preds(tmp_path, preds)
    code, stdout, stderr = run_main(eval_corloc.main, ["--input_file", str(path), "--gt_file", str(gt)])
    assert code == 2 and error_line(stderr).endswith(message) and "CorLoc" not in stdout
    with pytest.raises(UserError) as caught:
        evaluate_instances(path, gt, EvalOptions(iou_types=("bbox",)))
    assert str(caught.value).endswith(message)


def test_nan_gt_box_is_refused(tmp_path):
    gt = _coco_gt(tmp_path, {1: [[10, 10, float("nan"), 40]]})
    preds = _preds(tmp_path, [{"image_id": 1, "bbox": [10, 10, 40, 40], "score": 1.0}])
    with pytest.raises(UserError, match=r"gt\.json: annotation #0 has a 'bbox' \[10, 10, nan, 40\] with a non-finite"):
        evaluate_corloc(preds, gt_file=str(gt))


def test_corloc_voc_mini_from_converted_gt(voc_mini, tmp_path):
    from utils.voc import convert_voc_instances

    voc = voc_mini / "VOC2012"
    data = convert_voc_instances(voc, "trainval")
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(data))  # full dict: image ids mapped through file_name
    assert evaluate_corloc(pred_path, voc_root=str(voc)).corloc == pytest.approx(100.0)


def test_the_first_of_tied_predictions_is_the_most_confident(tmp_path):
    """LOST's protocol keeps an image's first prediction among those of the top score (ties: the first in the
    file): image 1's first hits its GT box, image 2's first misses it."""
    gt = _coco_gt(tmp_path, {1: [[0, 0, 10, 10]], 2: [[0, 0, 10, 10]]})
    hit, miss = [0, 0, 10, 10], [40, 40, 10, 10]
    preds = _preds(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": hit, "score": 0.5},
                              {"image_id": 1, "category_id": 1, "bbox": miss, "score": 0.5},
                              {"image_id": 2, "category_id": 1, "bbox": miss, "score": 0.5},
                              {"image_id": 2, "category_id": 1, "bbox": hit, "score": 0.5}])
    assert evaluate_corloc(preds, gt_file=str(gt)).per_image == {1: True, 2: False}
