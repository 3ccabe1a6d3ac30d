"""CorLoc on hand-made boxes (COCO JSON and VOC XML ground truth)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from utils.coco_io import make_annotation
from utils.corloc import evaluate_corloc, gt_from_voc
from utils.errors import UserError


def _gt(tmp_path):
    boxes = {1: [[10, 10, 40, 40]], 2: [[0, 0, 50, 50]], 3: [[5, 5, 20, 20]], 4: [[60, 60, 30, 30], [0, 0, 10, 20]], 5: []}
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in boxes],
          "annotations": [{"id": 10 * i + j, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                          for i, bs in boxes.items() for j, b in enumerate(bs)],
          "categories": [{"id": 1, "name": "object"}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_corloc_hand_made_boxes(tmp_path, repo_root):
    preds = [
        # image 1: IoU(10,10,40,40 | 14,10,40,40) = 36*40 / (2*1600 - 1440) = 0.818 -> correct
        {"image_id": 1, "category_id": 1, "bbox": [14, 10, 40, 40], "score": 0.9},
        # image 2: the most confident box misses (IoU 0.25); a better but less confident one does not count
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 25, 25], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.7},
        # image 3: no prediction -> miss
        # image 4: IoU exactly 0.5 with its second GT box ([0,0,10,20] vs [0,0,10,10]) -> correct
        {"image_id": 4, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.6},
        {"image_id": 4, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.1},
        # image 5 has no GT box: not counted
        {"image_id": 5, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.6},
    ]
    pred_path = tmp_path / "preds.json"
    pred_path.write_text(json.dumps(preds))
    result = evaluate_corloc(pred_path, gt_file=str(_gt(tmp_path)))
    assert result.per_image == {1: True, 2: False, 3: False, 4: True}
    assert result.corloc == pytest.approx(50.0)
    assert (result.num_images, result.num_without_prediction, result.num_without_gt) == (4, 1, 1)

    # A mask without a bbox uses its tight box; the CLI prints CorLoc last.
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[5:25, 5:25] = 1
    masked = preds + [dict(make_annotation(mask, 3, score=0.5), bbox=None)]
    del masked[-1]["bbox"]
    pred_path.write_text(json.dumps(masked))
    out_json = tmp_path / "corloc.json"
    proc = subprocess.run([sys.executable, "eval_corloc.py", "--input_file", str(pred_path), "--gt_file",
                           str(tmp_path / "gt.json"), "--out_json", str(out_json)], cwd=repo_root,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "CorLoc: 75.00"
    assert json.loads(out_json.read_text())["num_correct"] == 3

    # A prediction on an unknown image is an error naming it, with no number printed.
    pred_path.write_text(json.dumps(preds + [{"image_id": 99, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    proc = subprocess.run([sys.executable, "eval_corloc.py", "--input_file", str(pred_path), "--gt_file",
                           str(tmp_path / "gt.json")], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2 and "annotation #6" in proc.stderr and "99" in proc.stderr
    assert "CorLoc" not in proc.stdout


def _xml(name, objects):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><truncated>0</truncated><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><filename>{name}.jpg</filename><size><width>100</width><height>80</height></size>{objs}</annotation>"


def test_corloc_voc_xml(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    # VOC boxes are 1-based inclusive: xmin=1..xmax=20 is [0, 20) in pixel edges.
    (root / "Annotations" / "2007_000001.xml").write_text(_xml("2007_000001", [("dog", (1, 1, 20, 20), False)]))
    (root / "Annotations" / "2007_000002.xml").write_text(
        _xml("2007_000002", [("cat", (51, 41, 100, 80), True), ("cat", (1, 1, 10, 10), False)]))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("2007_000001\n2007_000002\n")
    preds = [{"image_id": 2007000001, "bbox": [0, 0, 20, 20], "score": 1.0},  # IoU 1 thanks to the -1 shift
             {"image_id": 2007000002, "bbox": [50, 40, 50, 40], "score": 1.0}]  # hits only the difficult box
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(preds))
    assert evaluate_corloc(pred_path, voc_root=str(root)).corloc == pytest.approx(100.0)
    hard = evaluate_corloc(pred_path, voc_root=str(root), no_hard=True)
    assert hard.per_image == {"2007_000001": True, "2007_000002": False}
    gt = gt_from_voc(root, "trainval")
    assert gt.boxes["2007_000001"].tolist() == [[0.0, 0.0, 20.0, 20.0]]  # 1-based inclusive -> pixel edges
    pred_path.write_text(json.dumps([{"image_id": 2007000001, "bbox": [10, 10, 20, 20], "score": 1.0}]))
    result = evaluate_corloc(pred_path, voc_root=str(root))  # IoU 100/700: miss; image 2: no prediction
    assert result.per_image == {"2007_000001": False, "2007_000002": False}
    with pytest.raises(UserError, match="exactly one"):
        evaluate_corloc(pred_path)
    with pytest.raises(UserError, match="--iou_threshold 1.5"):
        evaluate_corloc(pred_path, voc_root=str(root), iou_threshold=1.5)


def test_corloc_voc_mini_from_converted_gt(voc_mini, tmp_path):
    from utils.voc import convert_voc_instances

    voc = voc_mini / "VOC2012"
    data = convert_voc_instances(voc, "trainval")
    pred_path = tmp_path / "p.json"
    pred_path.write_text(json.dumps(data))  # full dict: image ids mapped through file_name
    assert evaluate_corloc(pred_path, voc_root=str(voc)).corloc == pytest.approx(100.0)
