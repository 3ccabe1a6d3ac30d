"""AP on set A and set B of finished partial-supervision runs, as one table (summarize.py).

A run directory is the `--output_dir` of train_net.py after training and inference, plus the
evaluations of its predictions on each class set by eval_instances.py:

    RUN_DIR/model_final.pth              training finished
    RUN_DIR/inference/results.json       predictions on the test set
    RUN_DIR/inference/eval_A.json        eval_instances.py --input_file RUN_DIR/inference/results.json \
    RUN_DIR/inference/eval_B.json            --gt_file GT --iou_type both --eval_classes <A or B> --out_json ...
    RUN_DIR/inference/coco_eval.json     optional: train_net.py's summary over all classes

The table follows the MaskX R-CNN paper's ablation tables: one row per run, mask AP (or box AP)
on set B (the classes without mask training data) first, then on set A.
"""
from __future__ import annotations

import os
from pathlib import Path

from utils.coco_io import load_json
from utils.errors import UserError

SETS = ("B", "A")  # the paper's column order: the transfer target first


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def read_set_eval(run_dir: Path, name: str, iou_type: str) -> tuple[dict, list[int], str]:
    """(metrics, evaluated category ids, what they were compared with) of RUN_DIR/inference/eval_<name>.json."""
    path = run_dir / "inference" / f"eval_{name}.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no inference/eval_{name}.json (write it with eval_instances.py "
                        f"--eval_classes <set {name}> --iou_type both --out_json {path})")
    results = run_dir / "inference" / "results.json"
    if results.is_file() and path.stat().st_mtime < results.stat().st_mtime:
        raise UserError(f"{path} is older than {results}: evaluate the current predictions again")
    report = load_json(path, "evaluation report")
    if not isinstance(report, dict) or "metrics" not in report or "eval_category_ids" not in report:
        raise UserError(f"{path} is not an eval_instances.py --out_json report")
    if not (report.get("options") or {}).get("eval_classes"):
        raise UserError(f"{path} evaluates all classes; set {name} needs eval_instances.py --eval_classes")
    if iou_type not in report["metrics"]:
        raise UserError(f"{path} has no {iou_type} metrics (evaluate with --iou_type {iou_type} or both)")
    return report["metrics"][iou_type], list(report["eval_category_ids"]), report.get("reference", "")


def run_row(run_dir: str | os.PathLike, iou_type: str = "segm") -> dict:
    """One table row: AP and AP50 on set B and set A (and over all classes when known)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not (run_dir / "model_final.pth").is_file():
        raise UserError(f"{run_dir} is not finished: it has no model_final.pth")
    if not (run_dir / "inference" / "results.json").is_file():
        raise UserError(f"{run_dir} has no inference/results.json: run train_net.py with --test_json (or --eval_only)")
    row: dict = {"run": str(run_dir)}
    seen: dict[str, set] = {}
    references: set[str] = set()
    for name in SETS:
        metrics, ids, reference = read_set_eval(run_dir, name, iou_type)
        row[name] = (metrics.get("AP"), metrics.get("AP50"))
        seen[name] = set(ids)
        references.add(reference)
    if seen["A"] & seen["B"]:
        raise UserError(f"{run_dir}: eval_A.json and eval_B.json share categories {sorted(seen['A'] & seen['B'])[:5]}")
    overall = run_dir / "inference" / "coco_eval.json"
    stats = load_json(overall, "COCO summary").get(iou_type, {}) if overall.is_file() else {}
    row["all"] = (stats.get("AP"), stats.get("AP50"))
    # older eval_instances.py reports do not say what they compared with
    row["reference"] = " / ".join(sorted(references)) or "the --gt_file of its eval_A.json and eval_B.json"
    return row


def summarize_runs(run_dirs: list[str], iou_type: str = "segm") -> str:
    """The table as Markdown (every run checked before anything is printed)."""
    if iou_type not in ("segm", "bbox"):
        raise UserError(f"iou_type must be segm or bbox, got {iou_type!r}")
    rows = [run_row(d, iou_type) for d in run_dirs]
    kind = "mask" if iou_type == "segm" else "box"
    header = (f"| run | {kind} AP on B | AP50 on B | {kind} AP on A | AP50 on A | AP (all) | AP50 (all) |\n"
              "|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['run']} | " + " | ".join(_fmt(v) for key in ("B", "A", "all") for v in r[key]) + " |"
             for r in rows]
    compared = [f"{r['run']}: {kind} AP of inference/results.json against {r['reference']}" for r in rows]
    return header + "\n".join(lines) + "\n\n" + "\n".join(compared)
