"""Distill one object mask per image from a self-supervised DINO ViT (MaskDistill, stage 1).

Examples:
  python gen_masks.py --dataset folder --dataset_root ../shared/data/tiny_coco/val2017 \\
      --weights random --pred_json_path masks.json
  python gen_masks.py --dataset VOCClass --dataset_root VOCdevkit --year 2012 --set trainval \\
      --pred_json_path voc12_masks.json
  Several processes or machines: run --shard 0/4 ... --shard 3/4 anywhere, then --merge; or
  torchrun --nproc_per_node 4 gen_masks.py ... (each rank takes one shard; rank 0 merges).
"""
from __future__ import annotations

import argparse

from utils.errors import run_cli

# distill.vit.ARCHS, spelled out so that --help does not import torch (tests/test_dinov2_cli.py checks they agree).
ARCHS = ["vit_small", "vit_base", "dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg", "dinov2_vitb14_reg"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["VOCClass", "COCO20k", "folder"],
                      help="image set: VOC (VOCdevkit layout), COCO20k (COCO JSON + file list), or any folder "
                           "of images searched recursively")
    data.add_argument("--dataset_root", help="VOCdevkit folder, COCO image root, or the image folder")
    data.add_argument("--year", default="2012", help="VOC year, e.g. 2007 or 2012 (default: %(default)s)")
    data.add_argument("--set", default="trainval", help="VOC image set name (default: %(default)s)")
    data.add_argument("--voc_split_folder", default="Segmentation", choices=["Segmentation", "Main"],
                      help="VOC ImageSets sub-folder holding the image list (default: %(default)s)")
    data.add_argument("--coco_json", help="COCO20k: the COCO instances JSON the subset is taken from")
    data.add_argument("--file_list", help="COCO20k: text file of image file names (LOST's coco_20k_filenames.txt); "
                                          "the subset GT and its class-agnostic twin are written next to the output")
    data.add_argument("--image_ids", default="auto", choices=["auto", "filename", "sequential"],
                      help="folder: image ids from integer file names (auto: when all are distinct integers, "
                           "so COCO folders match their GT) or 1..N (default: %(default)s)")
    data.add_argument("--max_images", type=int, default=0, help="process only the first N images (0: all)")

    model = p.add_argument_group("model")
    model.add_argument("--arch", default="vit_small", choices=ARCHS,
                       help="backbone: DINO vit_small/vit_base, or DINOv2 dinov2_vits14/dinov2_vitb14 and their "
                            "_reg variants with 4 register tokens (default: %(default)s)")
    model.add_argument("--patch_size", type=int, default=None, choices=[8, 14, 16],
                       help="ViT patch size: 16 (default) or 8 for DINO, 14 (the only one) for DINOv2")
    model.add_argument("--weights", default="dino",
                       help="'dino' (the official DINO or DINOv2 checkpoint of --arch via torch.hub, cached), a "
                            "checkpoint path, or 'random' (smoke tests only: the masks mean nothing) (default: %(default)s)")

    algo = p.add_argument_group("mask discovery")
    algo.add_argument("--features", default="auto", choices=["auto", "raw", "centred"],
                      help="backbone features the discovery reads: raw last-block queries/keys, or keys centred on "
                           "their mean over the image's patches; auto: the backbone's own (centred for DINOv2, "
                           "raw for DINO; see docs/dinov2.md) (default: %(default)s)")
    algo.add_argument("--heads", type=int, default=5, help="first heads averaged for the CLS-key scores (default: %(default)s)")
    algo.add_argument("--topk", type=float, default=0.4, help="fraction of patches kept as seed candidates (default: %(default)s)")
    algo.add_argument("--resize", type=int, default=640,
                      help="shorter side after resizing, as torchvision Resize; 0 keeps the size (default: %(default)s)")
    algo.add_argument("--max_size", type=int, default=2048, help="cap on the longer side after resizing (default: %(default)s)")

    out = p.add_argument_group("output")
    out.add_argument("--pred_json_path", required=True, help="output COCO JSON (images, annotations, categories)")
    out.add_argument("--mask_format", default="rle", choices=["rle", "polygon"], help="mask encoding (default: %(default)s, lossless)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output or part")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished images")
    out.add_argument("--shard", default="0/1", help="i/N: process every N-th image starting at i into its own part (default: %(default)s)")
    out.add_argument("--merge", action="store_true", help="join the finished shard parts of --pred_json_path into it")
    out.add_argument("--vis_dir", help="write an overlay PNG per image (mask, seed patch, box) and an index.html gallery here")

    speed = p.add_argument_group("speed")
    speed.add_argument("--batch_size", type=int, default=8, help="images per forward pass; batches hold images of equal padded size (default: %(default)s)")
    speed.add_argument("--num_workers", type=int, default=None, help="DataLoader decoding workers (default: min(4, CPUs - 1))")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    speed.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="ViT compute precision: bf16 autocast or fp32; auto takes bf16 where the hardware runs it "
                            "natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), fp32 elsewhere. Recorded in the "
                            "run settings: a resume must use the same (default: %(default)s)")
    speed.add_argument("--half", dest="precision", action="store_const", const="bf16", help="alias of --precision bf16")
    return p


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    from distill.generate import merge, run
    from utils.errors import UserError

    if args.merge:
        return merge(args)
    if not args.dataset or not args.dataset_root:
        raise UserError("--dataset and --dataset_root are required (or --merge)")
    if args.max_size and args.resize >= args.max_size:
        raise UserError(f"--max_size {args.max_size} must be larger than --resize {args.resize}")
    if not 0 < args.topk <= 1:
        raise UserError("--topk must be in (0, 1]")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    run(args)
    return 0


if __name__ == "__main__":
    run_cli(main)
