"""Run every stage of MaskDistill on a folder of images, resumably, and write OUT/report.html.

    python pipeline.py --images ../shared/data/tiny_coco/val2017 --out OUT \\
        --gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --tiny
    python pipeline.py --images MY_IMAGES --out OUT --method maskcut
    python pipeline.py --images MY_IMAGES --out OUT --arch dinov2_vits14 --weights CKPT      # all on one ViT, CPU budget

Stages, each in OUT/<stage>/: masks (gen_masks.py, with a gallery in masks/vis/index.html), cluster
(utils/cluster.py), maskrcnn (Mask R-CNN with self-training rounds), semantic (gen_segmentation.py),
deeplab (DeepLab-v3 with CRF rounds), eval (metrics; against --gt_json where given). A rerun skips
finished stages and resumes an unfinished one; a changed setting is refused, or with --overwrite reruns
from the first stage it affects. --backbone vit (the default when --weights is a checkpoint file) trains
Mask R-CNN and DeepLab on the masks stage's ViT checkpoint (--arch, --weights) with the CPU recipes (500
photos in under an hour on 2 cores); with --tiny, their tiny twins on that ViT. See docs/pipeline.md.
"""
from __future__ import annotations

import argparse

from distill.registry import method_names, method_summaries
from orchestrate.settings import AUTO_BACKBONE, BACKBONES, DEFAULT_ARCH
from utils.cli import add_device_arg, float_range, int_range
from utils.errors import run_cli
from utils.vit_archs import ARCHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder: one sub-folder per stage, and report.html")
    p.add_argument("--method", default="maskdistill", choices=method_names(),
                   help=f"mask discovery (gen_masks.py --method): {method_summaries()} (default: %(default)s)")
    p.add_argument("--gt_json", default=None,
                   help="COCO instances of the same images: adds mask/box AP, CorLoc, clustering ACC/NMI/ARI and "
                        "mIoU against it (only the eval stage reads it; it never trains anything)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny CPU configs, random ViT weights and a few iterations per stage: checks the whole "
                        "chain in minutes; the numbers mean nothing")
    p.add_argument("--arch", default=DEFAULT_ARCH, choices=ARCHS,
                   help="gen_masks.py --arch: the discovery ViT (its patch size comes from the arch or the checkpoint); "
                        "with --backbone vit also the detector's and DeepLab's (default: %(default)s)")
    p.add_argument("--weights", default=None,
                   help="gen_masks.py --weights: 'dino' (the arch's official checkpoint, the default), a checkpoint "
                        "path, or 'random' (the default with --tiny)")
    p.add_argument("--backbone", default=AUTO_BACKBONE, choices=(AUTO_BACKBONE, *BACKBONES),
                   help="backbone of Mask R-CNN and DeepLab: 'vit' runs them on the same --arch/--weights checkpoint "
                        "as the masks (the ViT CPU recipes of configs/, frozen ViT, token cache in OUT/vit_cache); "
                        "'resnet' takes the ResNet recipes and their own weights (DINO ResNet-50, ImageNet); 'auto' "
                        "(the default): 'vit' when --weights is a checkpoint file, else 'resnet'. An OUT made "
                        "with the other backbone is refused (pass --backbone to keep it, or --overwrite)")
    p.add_argument("--num_classes", type=int_range(1), default=None,
                   help="K-means clusters = pseudo-classes of Mask R-CNN and DeepLab (default: 20; 5 with --tiny)")
    p.add_argument("--self_training_rounds", type=int_range(1), default=2,
                   help="Mask R-CNN rounds: round 1 on the clusters, each next on the previous round's confident "
                        "predictions (default: %(default)s)")
    p.add_argument("--score_thresh", type=float_range(0, 1), default=0.7,
                   help="self-training: predictions kept as the next round's pseudo-labels (default: %(default)s)")
    p.add_argument("--label_threshold", type=float_range(0, 1), default=0.5,
                   help="gen_segmentation.py --threshold: predictions painted into the semantic labels "
                        "(default: %(default)s)")
    p.add_argument("--crf_rounds", type=int_range(0), default=1,
                   help="DeepLab refinement rounds on its own CRF-refined predictions, 0 = train once "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun the stages whose settings changed, deleting their earlier outputs; without it such a "
                        "run is refused")
    add_device_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrate.pipeline import run_pipeline, settings_from_args

    run_pipeline(settings_from_args(args))
    return 0


def cli() -> None:
    """Console-script entry point (`maskdistill-pipeline`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
