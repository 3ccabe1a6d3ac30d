"""Give every discovered mask a class without labels: ViT CLS features of the mask's box crop, K-means.

    python utils/cluster.py --input_file masks.json --image_root IMAGES --num_classes 20 --output_file labelled.json
    python utils/cluster.py --input_file voc12_masks.json --image_root VOCdevkit --output_file labelled.json \
        --gt_voc_root VOCdevkit/VOC2012 --num_classes 20 --support_file voc07_masks.json --support_root VOCdevkit

The backbone is the one gen_masks.py recorded for the masks (arch, patch size, weights; DINO or
DINOv2); --arch, --patch_size and --weights override it, with a warning when they differ. Without
ground truth the category ids written are cluster ids, not classes (the output says so, and a
warning explains why they must not be scored against a GT file's class ids). Features are cached by
content next to each mask file (or in --cache_dir), so a rerun with other clustering settings or
another --output_file skips the network. With ground truth, clusters are matched to classes and
ACC/NMI/ARI are reported. See docs/evaluation.md.

The parser and `main` of the clustering command: argparse, then one call into distill/cluster.py.
`python utils/cluster.py` (the documented command) and the `maskdistill-cluster` console script run them.
"""
from __future__ import annotations

import argparse

from distill.cluster import ClusterSettings, cluster_masks
from utils.cli import add_device_arg, add_num_workers_arg, int_range
from utils.errors import run_cli
from utils.vit_archs import archs_by_family

DEFAULTS = ClusterSettings(input_file="", image_root="", output_file="")  # the defaults shown below


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--input_file", required=True,
                      help="masks to label: gen_masks.py's COCO JSON, or a results list (then --gt_file gives the images)")
    data.add_argument("--image_root", required=True, help="folder the images' file_name is relative to")
    data.add_argument("--support_file", action="append", default=[],
                      help="extra masks (e.g. VOC07 for VOC12) that K-means is also fitted on; repeatable, "
                           "each with its own --support_root; support masks are not labelled")
    data.add_argument("--support_root", action="append", default=[], help="image root of each --support_file, in order")
    data.add_argument("--gt_file", default=None,
                      help="COCO GT of the target images: enables matching clusters to its classes and ACC/NMI/ARI")
    data.add_argument("--gt_voc_root", default=None,
                      help="instead of --gt_file: a VOC20XX folder whose Annotations/*.xml give the GT boxes and classes")
    out = p.add_argument_group("output")
    out.add_argument("--output_file", required=True, help="labelled COCO JSON (the input with category_id filled in)")
    out.add_argument("--metrics_json", default=None, help="write ACC/NMI/ARI, per-trial results and run info here")
    out.add_argument("--cache_dir", default=None,
                     help="where feature caches (.npy, keyed by content) go (default: next to each mask file)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --output_file or --metrics_json")
    model = p.add_argument_group("backbone (default: the one recorded with the masks by gen_masks.py)")
    model.add_argument("--arch", default=None,
                       help=f"backbone as gen_masks.py names it: {archs_by_family()}")
    model.add_argument("--patch_size", type=int_range(1), default=None,
                       help="ViT patch size: 8 or 16 for DINO, 14 for DINOv2 (default: the recorded one when --arch is "
                            "the recorded arch, else the arch's own)")
    model.add_argument("--weights", default=None, help="'dino' (official checkpoint), 'random' (tests only) or a path")
    km = p.add_argument_group("clustering")
    km.add_argument("--num_classes", type=int_range(1), default=None,
                    help="number of classes (default: the number of GT categories; required without GT)")
    km.add_argument("--overcluster", type=int_range(1), default=DEFAULTS.overcluster,
                    help="clusters = num_classes x this factor; > 1 uses majority matching (default: %(default)s)")
    km.add_argument("--seed", type=int_range(0), default=DEFAULTS.seed,
                    help="K-means seed of the first trial; trial t uses seed + t (default: %(default)s)")
    km.add_argument("--trials", type=int_range(1), default=DEFAULTS.trials,
                    help="K-means runs; the labels come from the run with the lowest inertia (never chosen with GT), "
                         "metrics are reported per run and averaged (default: %(default)s)")
    km.add_argument("--kmeans", default=DEFAULTS.kmeans, choices=["auto", "sklearn", "faiss"],
                    help="K-means backend; auto = faiss if installed, else scikit-learn MiniBatchKMeans (default: %(default)s)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--batch_size", type=int_range(1), default=DEFAULTS.batch_size,
                       help="crops per forward pass (crops of equal padded size) (default: %(default)s)")
    add_num_workers_arg(speed, DEFAULTS.num_workers)
    add_device_arg(speed, DEFAULTS.device)
    speed.add_argument("--half", action="store_true", help="bf16 autocast for the ViT (GPUs)")
    return p


def main(argv: list[str] | None = None) -> None:
    cluster_masks(ClusterSettings(**vars(build_parser().parse_args(argv))))


def cli() -> None:
    """The `maskdistill-cluster` console script: `main` with one-line errors and exit codes."""
    run_cli(main)

