"""Benchmark eval_instances (segm + bbox, with class-agnostic AR) and CorLoc on tiny_coco val2017
with perturbed GT predictions, repeated --copies times to scale the prediction count.

    python benchmarks/bench_eval.py --copies 4

Prints predictions/s, the metric rows (evaluation/rows.py) and peak RSS.
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"),
                   help="tiny_coco folder")
    p.add_argument("--copies", type=int, default=4, help="perturbed copies of the GT used as predictions (default: %(default)s)")
    args = p.parse_args()

    from evaluation.coco_eval import EvalOptions, ap_rows, evaluate_instances
    from evaluation.corloc import corloc_row, evaluate_corloc
    from tests.helpers.coco_perturb import perturbed_predictions

    gt_path = Path(args.data) / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_path.read_text())
    preds = [p for seed in range(args.copies) for p in perturbed_predictions(gt, seed)]
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "preds.json"
        pred_path.write_text(json.dumps(preds))
        start = time.perf_counter()
        result = evaluate_instances(pred_path, gt_path, EvalOptions(iou_types=("segm", "bbox"), iou_thresholds=(0.5, 0.7)))
        seconds = time.perf_counter() - start
        print(f"eval_instances: {len(preds)} predictions, {len(gt['images'])} images, segm+bbox: {seconds:.2f} s "
              f"= {len(preds) / seconds:.0f} predictions/s")
        start = time.perf_counter()
        corloc = evaluate_corloc(pred_path, gt_file=str(gt_path))
        seconds = time.perf_counter() - start
        print(f"corloc: {len(preds)} predictions in {seconds:.3f} s")
    label = f"{args.copies} perturbed GT copies"
    rows = ap_rows(result, label, gt_path.name, "eval") + [corloc_row(corloc, label, f"{gt_path.name} boxes", "eval")]
    for row in rows:
        print(f"  {row.metric}: {'n/a' if row.value is None else f'{row.value:.2f}'} (against {row.against})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
