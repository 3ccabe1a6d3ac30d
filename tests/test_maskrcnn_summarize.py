"""summarize.py: AP / AP50 on set B and set A of finished runs as one table; the paper's random splits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detectron2_train.results_table import summarize_runs
from detectron2_train.splits import paper_random_splits, read_class_list, write_splits
from evaluation.coco_eval import EvalOptions, evaluate_instances, format_report
from utils.coco_io import make_annotation, reference_name, write_json
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _gt() -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2)]
    anns = []
    for image_id in (1, 2):
        for category_id, x in ((1, 2), (2, 18)):
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[4:20, x:x + 10] = 1
            anns.append(make_annotation(mask, image_id, category_id, 1.0, ann_id=len(anns) + 1))
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]}


def _finished_run(root: Path, name: str, shift_b: int, gt_info: dict | None = None) -> Path:
    """A run whose set-A masks are exact and whose set-B masks are shifted by `shift_b` pixels, evaluated against
    root/gt.json (with `gt_info` as its info)."""
    gt = _gt()
    gt_path = root / "gt.json"
    write_json(gt_path, {**gt, "info": gt_info or {}})
    results = []
    for ann in gt["annotations"]:
        mask = np.zeros((32, 32), dtype=np.uint8)
        x = (2 if ann["category_id"] == 1 else 18 + shift_b)
        mask[4:20, x:x + 10] = 1
        results.append(make_annotation(mask, ann["image_id"], ann["category_id"], 0.9))
    run = root / name
    write_json(run / "inference" / "results.json", results)
    (run / "model_final.pth").write_bytes(b"")
    for set_name, classes in (("A", ("rectangle",)), ("B", ("ellipse",))):
        report = evaluate_instances(run / "inference" / "results.json", gt_path,
                                    EvalOptions(iou_types=("bbox", "segm"), eval_classes=classes))
        write_json(run / "inference" / f"eval_{set_name}.json", report.to_json())
    return run


def test_table_has_set_b_then_set_a_for_every_run(tmp_path):
    exact = _finished_run(tmp_path, "transfer", shift_b=0)
    shifted = _finished_run(tmp_path, "agnostic", shift_b=3)  # IoU 7/13 = 0.54 on set B
    write_json(exact / "inference" / "coco_eval.json", {"segm": {"AP": 61.5, "AP50": 99.0, "AP75": 50.0}})
    table = summarize_runs([str(exact), str(shifted)])
    lines = table.splitlines()
    assert lines[0] == "| run | mask AP on B | AP50 on B | mask AP on A | AP50 on A | AP (all) | AP50 (all) |"
    assert lines[2] == f"| {exact} | 100.0 | 100.0 | 100.0 | 100.0 | 61.5 | 99.0 |"
    assert lines[3] == f"| {shifted} | 10.0 | 100.0 | 100.0 | 100.0 | - | - |"
    against = f"mask AP of inference/results.json against the ground truth in {tmp_path / 'gt.json'}"
    assert lines[4:] == ["", f"{exact}: {against}", f"{shifted}: {against}"]
    box = summarize_runs([str(shifted)], "bbox").splitlines()
    assert box[2] == f"| {shifted} | 10.0 | 100.0 | 100.0 | 100.0 | - | - |"
    assert box[-1] == f"{shifted}: box AP of inference/results.json against the ground truth in {tmp_path / 'gt.json'}"


def test_summary_says_when_the_reference_is_pseudo_labels(tmp_path):
    """A reference written by mask discovery or self-training (its info says so) is named as pseudo-labels, in the
    summarize table, in eval_instances.py's report and in train_net.py's summary line (reference_name)."""
    run = _finished_run(tmp_path, "run", shift_b=0, gt_info={"description": "maskcut pseudo-masks"})
    assert summarize_runs([str(run)]).splitlines()[-1] == (
        f"{run}: mask AP of inference/results.json against the pseudo-labels in {tmp_path / 'gt.json'}")
    assert reference_name({"info": {"description": "pseudo-labels from r1/train_results.json"}}, "r2.json") == (
        "the pseudo-labels in r2.json")
    assert reference_name({"images": []}, "gt.json") == "the ground truth in gt.json"
    report = evaluate_instances(run / "inference" / "results.json", tmp_path / "gt.json", EvalOptions())
    assert format_report(report).splitlines()[0] == (
        f"evaluated 4 predictions against 4 objects in 2 images (2 categories) of the pseudo-labels in "
        f"{tmp_path / 'gt.json'}")


def test_unfinished_or_inconsistent_runs_are_one_line_errors(tmp_path):
    run = _finished_run(tmp_path, "run", shift_b=0)
    (run / "model_final.pth").unlink()
    with pytest.raises(UserError, match=r"run is not finished: it has no model_final.pth"):
        summarize_runs([str(run)])
    (run / "model_final.pth").write_bytes(b"")
    (run / "inference" / "eval_B.json").unlink()
    with pytest.raises(UserError, match=r"has no inference/eval_B.json \(write it with eval_instances.py"):
        summarize_runs([str(run)])
    (run / "inference" / "eval_B.json").write_text((run / "inference" / "eval_A.json").read_text())  # set A again
    with pytest.raises(UserError, match="share categories"):
        summarize_runs([str(run)])
    os.utime(run / "inference" / "eval_A.json", (1, 1))  # evaluated before the current predictions
    with pytest.raises(UserError, match="older than"):
        summarize_runs([str(run)])
    cmd = [sys.executable, str(REPO / "detectron2_train" / "summarize.py"), str(tmp_path / "missing")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: run directory not found: {tmp_path / 'missing'}"


def test_paper_random_splits_follow_the_papers_draw(tmp_path):
    categories = [{"id": 100 + 2 * i, "name": f"class{i}"} for i in range(80)]
    splits = paper_random_splits(categories)
    assert list(splits)[:6] == ["E1_A20B60", "E1_A30B50", "E1_A40B40", "E1_A50B30", "E1_A60B20", "E2_A20B60"]
    assert len(splits) == 25
    # the released code: np.random.seed(3), then for each trial and size np.random.choice(80, size, replace=False)
    legacy = np.random.RandomState(3)
    for name, (set_a, set_b) in splits.items():
        size = int(name.split("_A")[1].split("B")[0])
        positions = sorted(legacy.choice(80, size, replace=False).tolist())
        assert set_a == [100 + 2 * k for k in positions], name
        assert sorted(set_a + set_b) == [c["id"] for c in categories]
    write_splits(categories, "paper_random", tmp_path)
    assert read_class_list(tmp_path / "E3_A40B40" / "A.txt", categories) == splits["E3_A40B40"][0]
    assert read_class_list(tmp_path / "E5_A60B20" / "B.txt", categories) == splits["E5_A60B20"][1]
    with pytest.raises(UserError, match="more than 60 categories"):
        paper_random_splits(categories[:60])
