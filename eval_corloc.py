"""CorLoc (single-object discovery): percent of images whose most confident box has IoU >= 0.5 with a GT box,
by LOST's protocol (see docs/evaluation.md).

    python eval_corloc.py --input_file masks.json --gt_file instances_train2014_20k.json
    python eval_corloc.py --input_file voc07_masks.json --voc_root VOCdevkit/VOC2007 --image_set trainval

The last line printed is `CorLoc: <percent>`; the line before says how many images were counted and skipped.
"""
import argparse

from utils.cli import check_outputs, float_range
from utils.coco_io import write_json
from evaluation.corloc import evaluate_corloc
from utils.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True,
                        help="predictions: a COCO results list or a COCO dict (box from 'bbox', else from the mask)")
    gt = parser.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt_file", help="ground truth as a COCO JSON; every image in it is counted, crowd regions are "
                                      "never GT boxes")
    gt.add_argument("--voc_root",
                    help="ground truth from VOC XML: a VOC20XX folder with Annotations/ and ImageSets/Main/")
    parser.add_argument("--image_set", default="trainval",
                        help="with --voc_root: list in ImageSets/Main (or a path to a text file) (default: trainval)")
    parser.add_argument("--no_hard", action="store_true",
                        help="ignore VOC objects marked difficult or truncated, and skip (do not count) images left "
                             "without a GT box; without it such images count as misses")
    parser.add_argument("--iou_threshold", type=float_range(0.0, 1.0, min_inclusive=False), default=0.5,
                        help="box IoU for a correct localisation, in (0, 1] (default: 0.5)")
    parser.add_argument("--out_json", default=None, help="write CorLoc, counts and the per-image outcome to this JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace --out_json if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args.out_json, overwrite=args.overwrite)
    result = evaluate_corloc(args.input_file, args.gt_file, args.voc_root, args.image_set, args.no_hard,
                             args.iou_threshold)
    if args.out_json:
        write_json(args.out_json, result.to_json(), indent=2)
    if result.matched_by == "file_name":
        print(f"CorLoc {result.corloc:.2f} % over {result.num_images} of {result.num_gt_images} GT images "
              "(matched by file_name)")
    print(result.summary())
    print(f"CorLoc: {result.corloc:.2f}")


def cli() -> None:
    """The `maskdistill-eval-corloc` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
