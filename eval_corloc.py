"""CorLoc (single-object discovery): percent of images whose most confident box has IoU >= 0.5 with a GT box.

    python eval_corloc.py --input_file masks.json --gt_file instances_train2014_20k.json
    python eval_corloc.py --input_file voc07_masks.json --voc_root VOCdevkit/VOC2007 --image_set trainval

The last line printed is `CorLoc: <percent>`.
"""
import argparse

from utils.coco_io import check_writable, write_json
from utils.corloc import evaluate_corloc
from utils.errors import run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_file", required=True,
                        help="predictions: a COCO results list or a COCO dict (box from 'bbox', else from the mask)")
    gt = parser.add_mutually_exclusive_group(required=True)
    gt.add_argument("--gt_file", help="ground truth as a COCO JSON; every image in it that has a GT box is counted")
    gt.add_argument("--voc_root", help="ground truth from VOC XML: a VOC20XX folder with Annotations/ and ImageSets/Main/")
    parser.add_argument("--image_set", default="trainval",
                        help="with --voc_root: list in ImageSets/Main (or a path to a text file) (default: trainval)")
    parser.add_argument("--no_hard", action="store_true",
                        help="ignore VOC objects marked difficult or truncated, and COCO crowd regions; "
                             "images left without a GT box are not counted")
    parser.add_argument("--iou_threshold", type=float, default=0.5, help="box IoU for a correct localisation (default: 0.5)")
    parser.add_argument("--out_json", default=None, help="write CorLoc, counts and the per-image outcome to this JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.out_json:
        check_writable(args.out_json)
    result = evaluate_corloc(args.input_file, args.gt_file, args.voc_root, args.image_set, args.no_hard,
                             args.iou_threshold)
    if args.out_json:
        write_json(args.out_json, result.to_json(), indent=2)
    print(f"{result.num_correct} of {result.num_images} images correctly localised "
          f"({result.num_without_prediction} without a prediction, {result.num_without_gt} without a GT box, not counted)")
    print(f"CorLoc: {result.corloc:.2f}")


if __name__ == "__main__":
    run_cli(main)
