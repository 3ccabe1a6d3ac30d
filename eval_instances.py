"""Evaluate instance masks (and boxes) against COCO-format ground truth with pycocotools.

    python eval_instances.py --input_file masks.json --gt_file instances_val2017.json --class_agnostic
    python eval_instances.py --input_file masks.json --gt_file voc12_val.json --class_agnostic --eval_most_confident
    python eval_instances.py --input_file results.json --gt_file gt.json --iou_type both --iou_thresholds 0.5 0.7
    python eval_instances.py --input_file results.json --gt_file instances_val2017.json --class_agnostic \
        --eval_classes $(cut -d' ' -f1 splits/B.txt) --max_dets 10 20 50 100 300 1000 1500   # open world

Prints pycocotools' tables, mAP^r at --iou_thresholds, class-agnostic AR@1/10/100, the open-world
AR@k (with --eval_classes or --max_dets), and AP50 last.
"""
import argparse

from evaluation.coco_eval import EvalOptions, evaluate_instances, format_report
from utils.cli import check_outputs, float_range, int_range
from utils.coco_io import write_json
from utils.errors import run_cli

OPEN_WORLD_MAX_DETS = (10, 20, 50, 100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True,
                        help="predictions: a COCO results list or a full COCO dict (masks as RLE or polygons)")
    parser.add_argument("--gt_file", required=True, help="ground truth as a COCO instances JSON")
    parser.add_argument("--iou_type", choices=("segm", "bbox", "both"), default="segm",
                        help="mask AP, box AP, or both (default: segm)")
    parser.add_argument("--eval_most_confident", action="store_true",
                        help="single-object protocol: keep each image's most confident prediction, pair it with the "
                             "GT object of highest box IoU and evaluate on that selection")
    parser.add_argument("--class_agnostic", action="store_true",
                        help="fold all GT and predicted categories into one ('object')")
    parser.add_argument("--iou_thresholds", type=float_range(0.0, 1.0, min_inclusive=False, max_inclusive=False),
                        nargs="+", default=[],
                        help="also report mAP^r (mean precision over categories) at these mask/box IoU thresholds, "
                             "e.g. 0.5 0.7")
    parser.add_argument("--eval_classes", nargs="+", default=[],
                        help="evaluate only these GT categories (ids or names); with --class_agnostic, GT objects "
                             "of other categories are removed before folding for AP. Also reports the open-world "
                             "AR@k: class-agnostic recall of these categories' GT, where GT of other categories "
                             "is ignored and detections matched to it neither count nor use up the k places "
                             "(GGN's cross-category protocol)")
    parser.add_argument("--max_dets", type=int_range(1), nargs="+", default=None,
                        help="k of the open-world AR@k, up to any number (e.g. 10 20 50 100 300 1000 1500); "
                             f"default {' '.join(map(str, OPEN_WORLD_MAX_DETS))} with --eval_classes. Without "
                             "--eval_classes it is the class-agnostic AR@k of all categories")
    parser.add_argument("--out_json", default=None, help="write every number (percent; null = undefined) to this JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace --out_json if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args.out_json, overwrite=args.overwrite)
    options = EvalOptions(
        iou_types=("bbox", "segm") if args.iou_type == "both" else (args.iou_type,),
        most_confident=args.eval_most_confident,
        class_agnostic=args.class_agnostic,
        iou_thresholds=tuple(args.iou_thresholds),
        eval_classes=tuple(args.eval_classes),
        max_dets=tuple(args.max_dets or (OPEN_WORLD_MAX_DETS if args.eval_classes else ())),
    )
    result = evaluate_instances(args.input_file, args.gt_file, options)
    if args.out_json:
        write_json(args.out_json, result.to_json(), indent=2)
    print(format_report(result))


def cli() -> None:
    """The `maskdistill-eval-instances` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
