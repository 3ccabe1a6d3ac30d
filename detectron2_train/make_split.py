"""Write the set A / set B class lists for partial mask supervision (MaskX R-CNN).

  python detectron2_train/make_split.py --gt_file instances_train2017.json --split voc_to_nonvoc --out_dir splits/
  python detectron2_train/make_split.py --gt_file instances_train2017.json --split random --num_a 40 --seed 3 --out_dir splits/
  python detectron2_train/make_split.py --gt_file instances_train2017.json --split paper_random --out_dir splits/

Writes OUT_DIR/A.txt and OUT_DIR/B.txt, one `id  # name` line per class (`paper_random`: one
folder per split of the MaskX R-CNN paper, OUT_DIR/E1_A20B60/A.txt ... OUT_DIR/E5_A60B20/B.txt). Train with
`--mask_classes OUT_DIR/A.txt`; evaluate each set with
`eval_instances.py --eval_classes $(cut -d' ' -f1 OUT_DIR/A.txt)`.
"""
import argparse

from detectron2_train.splits import SPLITS, write_splits
from utils.cli import check_outputs, int_range
from utils.coco_io import load_coco_dataset
from utils.errors import UserError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt_file", required=True, help="COCO dataset whose categories are split")
    p.add_argument("--split", choices=SPLITS, default="voc_to_nonvoc",
                   help="voc_to_nonvoc: A = the 20 PASCAL classes; nonvoc_to_voc: A = the other 60; "
                        "random: --num_a classes drawn with --seed; paper_random: the paper's 25 random splits "
                        "E1-E5 x A20-A60, one sub-folder each")
    p.add_argument("--num_a", type=int_range(1), default=40,
                   help="random split: size of set A, at least 1 and less than the number of categories (default 40)")
    p.add_argument("--seed", type=int_range(0), default=0, help="random split: seed (default 0)")
    p.add_argument("--out_dir", required=True, help="folder for A.txt and B.txt (or for the split folders)")
    p.add_argument("--overwrite", action="store_true", help="replace class lists already in --out_dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_outputs(folders=[args.out_dir])
    categories = load_coco_dataset(args.gt_file)["categories"]
    if not categories:
        raise UserError(f"{args.gt_file} has no 'categories': make_split splits a dataset's categories into "
                        "seen (A) and unseen (B) classes; pass a COCO dataset that lists them")
    print(write_splits(categories, args.split, args.out_dir, args.num_a, args.seed, args.overwrite))


def cli() -> None:
    """The `maskdistill-make-split` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
