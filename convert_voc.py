"""Convert PASCAL VOC SegmentationObject + SegmentationClass PNGs into a COCO instances JSON.

    python convert_voc.py --voc_root VOCdevkit/VOC2012 --image_set val --out_file voc12_val_instances.json

The result is the ground truth for VOC instance evaluation (eval_instances.py).
"""
import argparse

from utils.cli import check_outputs
from utils.coco_io import write_json
from utils.errors import run_cli
from utils.voc import convert_voc_instances


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc_root", required=True,
                        help="VOC20XX folder holding SegmentationObject/, SegmentationClass/ and ImageSets/Segmentation/")
    parser.add_argument("--image_set", default="trainval",
                        help="name of a list in ImageSets/Segmentation (train, val, trainval), a path to a "
                             "text file of image names, or 'all' for every PNG in SegmentationObject (default: trainval)")
    parser.add_argument("--out_file", required=True, help="output COCO instances JSON")
    parser.add_argument("--mask_format", choices=("rle", "polygon"), default="rle",
                        help="rle is exact; polygon traces outer contours (approximate, holes are lost) (default: rle)")
    parser.add_argument("--class_agnostic", action="store_true",
                        help="give every instance category 1 ('object') instead of its VOC class")
    parser.add_argument("--overwrite", action="store_true", help="replace --out_file if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(args.out_file, overwrite=args.overwrite)
    dataset = convert_voc_instances(args.voc_root, args.image_set, args.mask_format, args.class_agnostic)
    write_json(args.out_file, dataset)
    print(f"wrote {len(dataset['annotations'])} instances in {len(dataset['images'])} images to {args.out_file}")


def cli() -> None:
    """The `maskdistill-convert-voc` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
