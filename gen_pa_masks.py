"""Open-world pseudo-masks from pairwise affinity (GGN, Wang et al. CVPR 2022): the top-k class-agnostic
masks of each image, grouped from its PA map, as COCO JSON with scores.

Examples:
  python gen_pa_masks.py --dataset folder --dataset_root ../shared/data/tiny_coco/val2017 --affinity oracle \\
      --gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --pred_json_path pa_oracle.json
  python gen_pa_masks.py --dataset folder --dataset_root coco/train2017 --affinity output/pa/model_final.pth \\
      --topk 20 --pred_json_path pa_masks.json

`--affinity oracle` computes the PA map from the ground-truth masks of --gt_json (the upper bound of
the grouping); a checkpoint path uses a trained PA predictor. Writes PRED_JSON_PATH (a COCO dataset),
PRED.results.json (the annotations as a COCO results list) and PRED.config.yaml.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import DEVICE_CHOICES, add_device_arg, add_num_workers_arg, check_outputs, float_range, int_range
from utils.errors import run_cli

# The flags that change the masks: recorded with the output.
SETTINGS = ("dataset", "dataset_root", "year", "set", "voc_split_folder", "coco_json", "file_list", "image_ids",
            "max_images", "affinity", "gt_json", "peak_radius", "globalization", "border_ratio", "nms_iou", "min_area",
            "topk", "mask_format")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("images (as gen_masks.py)")
    data.add_argument("--dataset", required=True, choices=["VOCClass", "COCO20k", "folder"],
                      help="image set: VOC (VOCdevkit layout), COCO20k (COCO JSON + file list), or any folder "
                           "of images searched recursively")
    data.add_argument("--dataset_root", required=True, help="VOCdevkit folder, COCO image root, or the image folder")
    data.add_argument("--year", default="2012", help="VOC year (default: %(default)s)")
    data.add_argument("--set", default="trainval", help="VOC image set name (default: %(default)s)")
    data.add_argument("--voc_split_folder", default="Segmentation", choices=["Segmentation", "Main"],
                      help="VOC ImageSets sub-folder holding the image list (default: %(default)s)")
    data.add_argument("--coco_json", help="COCO20k: the COCO instances JSON the subset is taken from")
    data.add_argument("--file_list", help="COCO20k: text file of image file names")
    data.add_argument("--image_ids", default="auto", choices=["auto", "filename", "sequential"],
                      help="folder: image ids from integer file names (auto: when all are distinct integers, "
                           "so COCO folders match their GT) or 1..N (default: %(default)s)")
    data.add_argument("--max_images", type=int_range(0), default=0, help="process only the first N images (0: all)")

    affinity = p.add_argument_group("affinity")
    affinity.add_argument("--affinity", required=True,
                          help="'oracle' (PA of the ground-truth masks of --gt_json) or a PA predictor checkpoint "
                               "(train_affinity.py)")
    affinity.add_argument("--gt_json", help="oracle: COCO instances JSON of the images (ids and sizes must match)")
    add_device_arg(affinity, help=f"predictor device: {DEVICE_CHOICES} (default: auto)")

    grouping = p.add_argument_group("grouping and ranking (distill/grouping.py)")
    grouping.add_argument("--topk", type=int_range(1), default=20, help="masks kept per image, best first (default: %(default)s)")
    grouping.add_argument("--globalization", type=float_range(0, 1), default=0.5,
                          help="weight of the spectral (global) boundary blended with the local one, 0 = off "
                               "(default: %(default)s)")
    grouping.add_argument("--peak_radius", type=int_range(1), default=10,
                          help="watershed markers: local maxima of PA over (2r+1)^2 windows (default: %(default)s)")
    grouping.add_argument("--nms_iou", type=float_range(0, 1, min_inclusive=False), default=0.2,
                          help="mask NMS: drop a mask overlapping a better one above this IoU (default: %(default)s)")
    grouping.add_argument("--border_ratio", type=float_range(0), default=0.9,
                          help="drop regions with more pixels on the image frame than this x their contour "
                               "(default: %(default)s)")
    grouping.add_argument("--min_area", type=int_range(0), default=0, help="drop masks with fewer pixels (default: %(default)s)")

    out = p.add_argument_group("output")
    out.add_argument("--pred_json_path", required=True, help="output COCO JSON (images, annotations, categories)")
    out.add_argument("--mask_format", default="rle", choices=["rle", "polygon"], help="mask encoding (default: %(default)s)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_num_workers_arg(out, None, help="grouping worker processes, 0 = in the main process (default: min(4, CPUs - 1))")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill.pa_source import ORACLE, generate_pa_masks
    from utils.errors import UserError

    check_outputs(args.pred_json_path, overwrite=args.overwrite)
    if args.affinity == ORACLE and not args.gt_json:
        raise UserError("--affinity oracle needs --gt_json")
    settings = {k: getattr(args, k) for k in SETTINGS}
    for key in ("dataset_root", "gt_json", "coco_json", "file_list"):
        if settings[key]:
            settings[key] = str(Path(settings[key]).resolve())
    if settings["affinity"] != ORACLE:
        settings["affinity"] = str(Path(settings["affinity"]).resolve())
    generate_pa_masks(args, settings)
    return 0


def cli() -> None:
    """The `maskdistill-gen-pa-masks` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
