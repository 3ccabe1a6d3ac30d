"""One HTML page comparing masks files side by side: every image with one panel per file (methods,
backbones, runs), the ground truth first when given. The page opens from the file system (no server):
captions with score, box and area, sorting and filtering, paging, fill/outline views and an opacity
slider, each file's settings, and a red banner for masks made with random weights. See docs/gallery.md.

Examples:
  python make_gallery.py --images ../shared/data/tiny_coco/val2017 --masks maskcut.json tokencut.json \\
      --gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --out gallery
  python make_gallery.py --images VOCdevkit --masks dino.json dinov2.json --labels "DINO ViT-S/16" \\
      "DINOv2 ViT-S/14" --out compare --max_images 100
"""
from __future__ import annotations

import argparse

from utils.cli import int_range
from utils.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True,
                   help="image root: the masks files' file_name values are relative to it (gen_masks.py's --dataset_root)")
    p.add_argument("--masks", required=True, nargs="+",
                   help="masks files, one column each, left to right: COCO datasets (gen_masks.py output; their "
                        "info.settings are shown) or COCO results lists (then another file or --gt_json lists the images)")
    p.add_argument("--labels", nargs="+", help="column names, one per --masks file (default: the file names' stems)")
    p.add_argument("--gt_json", help="COCO ground truth, shown as the first column (each image's GT masks, matched by "
                                     "file name whatever the ids); the captions then give each mask's best IoU with "
                                     "a GT mask, and the page sorts by it")
    p.add_argument("--out", required=True, help="output folder: index.html, thumbnails and the layers of every column")
    p.add_argument("--title", help="page title (default: the labels)")
    p.add_argument("--max_images", type=int_range(0), default=0,
                   help="only the first N images by file name (0: all) (default: %(default)s)")
    p.add_argument("--page_size", type=int_range(1), default=24,
                   help="images per page when the page opens; the page can change it (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out/index.html and its files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill.gallery import build_gallery

    page = build_gallery(args.out, args.images, args.masks, labels=args.labels, gt_json=args.gt_json,
                         title=args.title, max_images=args.max_images, page_size=args.page_size,
                         overwrite=args.overwrite)
    print(f"wrote {page}")
    return 0


def cli() -> None:
    """The `maskdistill-make-gallery` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
