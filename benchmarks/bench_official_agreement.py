"""Agreement of two mask files of the same images: this code's `gen_masks.py` output against the output
of an official implementation (e.g. CutLER's `maskcut/maskcut.py`, run in its own checkout outside this
repository), or any two runs. Prints per image and the mean Hungarian-matched mask IoU
(`distill.quality.matched_mask_iou`; images matched by base name).

  .venv/bin/python benchmarks/bench_official_agreement.py ours.json official.json [--json out.json]

No official code is imported or copied here: the official script writes its own COCO file. See
docs/gen_masks.md ("Agreement with the official code") for the runs and figures.
"""
from __future__ import annotations

import argparse

import numpy as np

from distill.quality import mask_file_agreement
from utils.coco_io import load_json, write_json
from utils.errors import run_cli


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", help="a COCO mask file (e.g. gen_masks.py --pred_json_path)")
    p.add_argument("second", help="a COCO mask file of the same images (e.g. the official script's output)")
    p.add_argument("--json", help="also write the per-image figures and the mean here")
    args = p.parse_args()
    # load_json, not load_coco_dataset: CutLER's file swaps image width and height, which that check refuses
    first, second = load_json(args.first, "mask file"), load_json(args.second, "mask file")
    per_image = mask_file_agreement(first, second)
    for name, iou in per_image.items():
        print(f"{name}  {iou:.4f}")
    summary = {"images": len(per_image), "masks": [len(first["annotations"]), len(second["annotations"])],
               "mean_matched_iou": float(np.mean(list(per_image.values()))),
               "identical_images": int(sum(v == 1.0 for v in per_image.values())), "per_image": per_image}
    print(f"images {summary['images']}  masks {summary['masks'][0]} vs {summary['masks'][1]}  "
          f"identical {summary['identical_images']}  mean matched mask IoU {summary['mean_matched_iou']:.4f}")
    if args.json:
        write_json(args.json, summary, indent=2)
    return 0


if __name__ == "__main__":
    run_cli(main)
