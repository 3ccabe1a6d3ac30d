"""Turn Mask R-CNN instance predictions (COCO results JSON) into semantic pseudo-label PNGs.

Example:
    python segmentation/gen_segmentation.py --results outputs/maskrcnn/results.json \\
        --dataset data/voc_trainaug.json --out_dir outputs/pseudo_labels --threshold 0.5
"""
import argparse

from segmentation.painting import generate_segmentation
from utils.cli import check_outputs, float_range
from utils.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Paint instance predictions into VOC-palette class maps (0 = background, 255 = ignore), "
                    "one PNG per image named like the image relative to the deepest folder holding all the images "
                    "(VOC2012/JPEGImages/<id>.jpg -> OUT_DIR/<id>.png), plus an image list for training.")
    parser.add_argument("--results", required=True,
                        help="COCO results JSON (list of {image_id, category_id, segmentation, bbox, score}) "
                             "or a COCO dict whose annotations carry scores")
    parser.add_argument("--dataset", required=True,
                        help="COCO dataset JSON giving each image id its file_name, height and width")
    parser.add_argument("--out_dir", required=True, help="folder for the label PNGs (created if needed)")
    parser.add_argument("--list", default=None,
                        help="image list to write, one entry per line (file name without extension); "
                             "default OUT_DIR/train.txt")
    parser.add_argument("--threshold", type=float_range(0.0, 1.0), default=0.5,
                        help="keep predictions with score >= this, in [0, 1]; when none passes, the single best "
                             "prediction of the image is kept (default 0.5)")
    parser.add_argument("--ignore_uncertain", action="store_true",
                        help="mark pixels covered only by predictions below the threshold as 255 (ignore)")
    parser.add_argument("--class_ids", choices=("category_id", "contiguous"), default="category_id",
                        help="label value of a prediction: its category_id (default; ids must be 1..254), or "
                             "contiguous 1..K in category-id order (the map is saved as OUT_DIR/class_map.json)")
    parser.add_argument("--keep_empty", action="store_true",
                        help="paint images without any prediction all background and list them (by default they "
                             "are left out of the list, with a warning naming them)")
    parser.add_argument("--overwrite", action="store_true",
                        help="repaint label PNGs that already exist (by default they are kept, so a job resumes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_outputs(args.list, folders=[args.out_dir])
    stats = generate_segmentation(args.results, args.dataset, args.out_dir, args.list, args.threshold,
                                  args.ignore_uncertain, args.class_ids, args.overwrite, args.keep_empty)
    print(f"{stats['images']} images: {stats['written']} written, {stats['skipped']} kept from before, "
          f"{stats['fallback']} used the best-prediction fallback, {stats['empty']} had no prediction")
    print(f"image list: {stats['list']} ({stats['listed']} images)")
    print(f"for segmentation/train.py: data.label_dir={stats['label_dir']} data.train_list={stats['list']} "
          f"data.image_dir=<the dataset's image root>{'/' + stats['image_subdir'] if stats['image_subdir'] else ''}")
    return 0


def cli() -> None:
    """The `maskdistill-gen-segmentation` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
