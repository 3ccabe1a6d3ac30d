"""Discover object masks in images with a self-supervised ViT: MaskDistill, LOST, TokenCut or MaskCut.

Examples:
  python gen_masks.py --dataset folder --dataset_root ../shared/data/tiny_coco/val2017 \\
      --weights random --pred_json_path masks.json
  python gen_masks.py --method maskcut --dataset folder --dataset_root IMAGES --pred_json_path maskcut.json
  python gen_masks.py --dataset folder --dataset_root val2017 --gt_json instances_val2017.json \\
      --exclude 'masks' --pred_json_path masks.json   # ids from the GT by file name; masks/ left out
  python gen_masks.py --dataset VOCClass --dataset_root VOCdevkit --year 2012 --set trainval \\
      --pred_json_path voc12_masks.json
  Several processes or machines: run --shard 0/4 ... --shard 3/4 anywhere, then --merge; or
  torchrun --nproc_per_node 4 gen_masks.py ... (each rank takes one shard; rank 0 merges).
"""
from __future__ import annotations

import argparse

from distill.cli import add_image_arguments, add_output_arguments, image_ids_mode
from distill.registry import FEATURE_SETTINGS, FOREGROUND_RULES, MASK_SCORES, method_names, method_summaries
from utils.cli import add_device_arg, add_num_workers_arg, float_range, int_range
from utils.errors import run_cli
from utils.vit_archs import ARCHS, PATCH_SIZES, archs_by_family


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    images = add_image_arguments(p)
    images.add_argument("--gt_json", dest="image_ids", type=lambda path: image_ids_mode(f"from:{path}"),
                        help="folder: alias of --image_ids from:GT.json: image ids from that COCO file by file name, "
                             "so the masks line up with it whatever its numbering")

    model = p.add_argument_group("backbone")
    model.add_argument("--arch", default="vit_small", choices=ARCHS,
                       help=f"backbone: {archs_by_family()}; the _reg variants have 4 register tokens "
                            "(default: %(default)s)")
    model.add_argument("--patch_size", type=int, default=None, choices=PATCH_SIZES,
                       help="ViT patch size: 16 (default) or 8 for DINO, 14 (the only one) for DINOv2")
    model.add_argument("--weights", default="dino",
                       help="'dino' (the official DINO or DINOv2 checkpoint of --arch via torch.hub, cached), a "
                            "checkpoint path, or 'random' (smoke tests only: the masks mean nothing) (default: %(default)s)")
    model.add_argument("--features", default="auto", choices=["auto", *FEATURE_SETTINGS],
                       help="backbone features the methods' patch graphs read: raw last-block keys, keys centred on "
                            "their mean over the image's patches (centred), or the final normalised output tokens "
                            "centred the same way (centred_tokens); CLS attention always reads the raw queries/keys; "
                            "auto: the method's default on the backbone (raw for DINO; on DINOv2 centred_tokens for "
                            "lost, centred for the others; see docs/dinov2.md) (default: %(default)s)")
    model.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="ViT compute precision: bf16 autocast or fp32; auto: bf16 on CUDA GPUs with bf16, on a "
                            "CPU the faster of the two for one forward at the job's input size (measured once per "
                            "CPU model, arch and size, cached in $MASKDISTILL_CACHE), fp32 elsewhere. Recorded in "
                            "the run settings with the reason: a resume must use the same (default: %(default)s)")
    model.add_argument("--half", dest="precision", action="store_const", const="bf16", help="alias of --precision bf16")

    algo = p.add_argument_group("method", "Flags left out take the method's official default; a flag of "
                                          "another method is an error.")
    algo.add_argument("--method", default="maskdistill", choices=method_names(),
                      help=f"{method_summaries()} (default: %(default)s)")
    algo.add_argument("--heads", type=int_range(1), default=None,
                      help="maskdistill: first heads averaged for the CLS-key scores (default 5; more than the "
                           "model has means all)")
    algo.add_argument("--topk", type=float_range(0, 1, min_inclusive=False), default=None,
                      help="maskdistill: fraction of patches kept as seed candidates, in (0, 1] (default 0.4)")
    algo.add_argument("--k_patches", type=int_range(1), default=None,
                      help="lost: lowest-degree patches compared with the seed (default 100)")
    algo.add_argument("--tau", type=float_range(0, 1, max_inclusive=False), default=None,
                      help="tokencut, maskcut: cosine-similarity threshold of the patch graph, in [0, 1) "
                           "(default: tokencut 0.2, maskcut 0.15)")
    algo.add_argument("--num_objects", type=int_range(1), default=None,
                      help="maskcut: most masks per image, one normalized cut each (default 3)")
    algo.add_argument("--foreground", default=None, choices=FOREGROUND_RULES,
                      help="tokencut, maskcut: which side of a cut is the object: eigenvector (the official rule: "
                           "the side of the eigenvector's largest magnitude, for maskcut also the side holding fewer "
                           "than 3 image corners) or attention (the side the CLS token attends to more) "
                           "(default: eigenvector; attention on DINOv2 archs)")
    algo.add_argument("--mask_score", default=None, choices=MASK_SCORES,
                      help="maskcut: the score that ranks its masks (written best-first): official (1 - Ncut/2 of "
                           "the patch mask, for reproduction) or attention (mean CLS attention over the mask's "
                           "patches, scaled to [0, 1] per image) (default: official; attention on DINOv2 archs)")
    algo.add_argument("--resize", type=int_range(0), default=None,
                      help="shorter side after resizing, as torchvision Resize (bilinear); 0 keeps the size "
                           "(default: maskdistill 640, lost and tokencut 0; lost 320 on DINOv2 archs)")
    algo.add_argument("--fixed_size", type=int_range(0), default=None,
                      help="resize to a fixed_size x fixed_size square (LANCZOS), as CutLER; excludes --resize "
                           "(default: maskcut 480, others 0 = off)")
    algo.add_argument("--max_size", type=int_range(1), default=2048,
                      help="cap on the longer side after resizing (default: %(default)s)")

    add_output_arguments(p)

    speed = p.add_argument_group("speed")
    speed.add_argument("--batch_size", type=int_range(1), default=8,
                       help="images per forward pass; batches hold images of equal network size (default: %(default)s)")
    add_num_workers_arg(speed, None, help="DataLoader decoding workers, 0 = decode in the main process "
                                          "(default: min(4, CPUs - 1))")
    speed.add_argument("--post_workers", type=int_range(0), default=None,
                       help="processes for the per-image CPU work (CRF, upsampling, RLE), which overlaps the "
                            "network; 0 runs it in the main process (default: min(8, CPUs))")
    add_device_arg(speed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distill.engine import gen_masks_from_args, generate_masks

    generate_masks(gen_masks_from_args(args))
    return 0


def cli() -> None:
    """The `maskdistill-gen-masks` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
