"""Open-world pseudo-masks from pairwise affinity (GGN, Wang et al. CVPR 2022): the top-k class-agnostic
masks of each image, grouped from its PA map, as COCO JSON with scores.

Examples:
  python gen_pa_masks.py --dataset folder --dataset_root ../shared/data/tiny_coco/val2017 --affinity oracle \\
      --gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --pred_json_path pa_oracle.json
  python gen_pa_masks.py --dataset folder --dataset_root coco/train2017 --affinity output/pa/model_final.pth \\
      --topk 20 --pred_json_path pa_masks.json

`--affinity oracle` computes the PA map from the ground-truth masks of --gt_json (the upper bound of
the grouping); a checkpoint path uses a trained PA predictor. Writes PRED_JSON_PATH (a COCO dataset),
PRED.results.json (the annotations as a COCO results list) and PRED.config.yaml, through the job of
gen_masks.py: several processes or machines run --shard 0/4 ... --shard 3/4 then --merge (or torchrun,
one shard per rank), an interrupted run continues with --resume (refused if the settings or the PA
checkpoint's content changed), and --vis_dir draws every image's masks into a gallery.
"""
from __future__ import annotations

import argparse

from distill.cli import add_image_arguments, add_output_arguments
from utils.cli import DEVICE_CHOICES, add_device_arg, add_num_workers_arg, float_range, int_range
from utils.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_arguments(p)

    # The group titles are those of distill.cli.SETTING_GROUPS: their flags are the recorded settings.
    affinity = p.add_argument_group("backbone", "the PA map: the oracle or a trained PA predictor")
    affinity.add_argument("--affinity",
                          help="'oracle' (PA of the ground-truth masks of --gt_json) or a PA predictor checkpoint "
                               "(train_affinity.py); required except with --merge")
    affinity.add_argument("--gt_json", help="oracle: COCO instances JSON of the images (ids and sizes must match)")

    grouping = p.add_argument_group("method", "grouping and ranking of the PA map (distill/grouping.py)")
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

    add_output_arguments(p)

    speed = p.add_argument_group("speed")
    add_num_workers_arg(speed, None, help="grouping worker processes, 0 = in the main process (default: min(4, CPUs - 1))")
    add_device_arg(speed, help=f"PA predictor device: {DEVICE_CHOICES} (default: auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from orchestrate.pa_source import gen_pa_masks_from_args, generate_pa_masks

    generate_pa_masks(gen_pa_masks_from_args(parser, args))
    return 0


def cli() -> None:
    """The `maskdistill-gen-pa-masks` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
