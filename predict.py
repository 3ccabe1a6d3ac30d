"""Predict with a trained Mask R-CNN (detectron2_train/train_net.py) on a plain folder of images, with no
hand-made COCO file: the folder's images are listed and numbered, and OUT receives

  images.json       the images (ids 1..N in path order, file_name relative to --images, sizes) and the
                    model's categories: what the ids of results.json mean
  results.json      COCO results list: image_id, category_id, RLE segmentation, bbox, score (best first)
  predictions.json  the same as a COCO dataset naming its images: evaluators and make_gallery.py match it to
                    any ground truth by file_name, whatever the GT's ids
  config.yaml       the model config used
  gallery/index.html  every image with its masks (as make_gallery.py draws them)

Examples:
  python predict.py --weights output/tiny/model_final.pth --images ../shared/data/tiny_coco/val2017 --out pred
  python predict.py --weights model_final.pth --images photos --out pred --score_thresh 0.05 --no_gallery
  python eval_instances.py --input_file pred/predictions.json --gt_file my_gt.json
"""
from __future__ import annotations

import argparse

from utils.cli import add_device_arg, float_range, int_range
from utils.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True,
                   help="Mask R-CNN checkpoint written by train_net.py (e.g. OUTPUT_DIR/model_final.pth); its "
                        "recorded config builds the model")
    p.add_argument("--images", required=True,
                   help="folder of images, searched recursively (hidden files and folders left out)")
    p.add_argument("--out", required=True, help="output folder for the files listed above")
    p.add_argument("--score_thresh", type=float_range(0, 1), default=0.5,
                   help="keep detections scoring at least this (the model's box_score_thresh); lower it, e.g. "
                        "0.05, to score AP (default: %(default)s)")
    p.add_argument("--config", default=None,
                   help="model config YAML, only for a checkpoint that records none (a bare state dict) "
                        "(default: the checkpoint's)")
    p.add_argument("--max_images", type=int_range(0), default=0,
                   help="only the first N images by path, 0 = all (default: %(default)s)")
    p.add_argument("--no_gallery", action="store_true", help="do not write OUT/gallery")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrate.predict import PredictSettings, predict_folder

    summary = predict_folder(PredictSettings(
        weights=args.weights, images=args.images, out=args.out, score_thresh=args.score_thresh, config=args.config,
        max_images=args.max_images, gallery=not args.no_gallery, device=args.device, overwrite=args.overwrite))
    for item in summary["skipped"]:
        print(f"skipped {item['file_name']}: {item['reason']}")
    print(f"wrote {summary['predictions']} predictions on {summary['images']} images "
          f"({len(summary['skipped'])} skipped) to {args.out}")
    return 0


def cli() -> None:
    """The `maskdistill-predict` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
