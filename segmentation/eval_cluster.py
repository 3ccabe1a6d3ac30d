"""Clustering evaluation ("clusters" in the paper): K-means on the frozen network's pixel embeddings over val,
Hungarian matching of the clusters to the classes, then mIoU.

    python segmentation/eval_cluster.py --config configs/segmentation/deeplab_voc.yml \\
        --model_path outputs/segmentation/deeplab_voc/model_final.pth
"""
import argparse

from segmentation.settings import VAL_KEYS
from utils.cli import add_device_arg, check_outputs, int_range
from utils.coco_io import write_json
from utils.config import add_config_args, run_config_from_args
from utils.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="K-means over frozen pixel embeddings on val, Hungarian matching "
                                                 "to the classes, mIoU and per-class IoU.")
    add_config_args(parser, config_help="YAML config whose data section names the val images and GT",
                    set_example="data.val_list=...", must_set=VAL_KEYS,
                    example="python segmentation/eval_cluster.py --config configs/segmentation/tiny_test.yml "
                            "--model_path outputs/segmentation/tiny_test/model_final.pth --device cpu "
                            "--set data.val_image_dir=../shared/data/voc_mini/VOCdevkit/VOC2012/JPEGImages "
                            "data.val_label_dir=../shared/data/voc_mini/VOCdevkit/VOC2012/SegmentationClass "
                            "data.val_list=../shared/data/voc_mini/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")
    parser.add_argument("--model_path", required=True, help="trained DeepLab-v3 checkpoint (model_final.pth)")
    parser.add_argument("--num_clusters", type=int_range(1), default=None,
                        help="K for K-means; must equal data.num_classes for one-to-one matching (default)")
    parser.add_argument("--max_fit_pixels", type=int_range(1), default=200_000,
                        help="embedding pixels sampled over the split to fit K-means (default 200000)")
    parser.add_argument("--seed", type=int_range(0), default=0, help="seed of the pixel sample and K-means (default 0)")
    parser.add_argument("--output", default=None, help="write the result (IoU table, mapping) to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_device_arg(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_outputs(args.output, overwrite=args.overwrite)
    # torch: after parsing, so that --help stays quick
    from segmentation.engine import build_val_dataset, class_names, format_iou, load_trained_model
    from segmentation.kmeans_eval import evaluate_clusters
    from segmentation.probe import PROBE_SCHEMA
    from utils.distributed import resolve_device

    config = run_config_from_args(args, PROBE_SCHEMA)  # any segmentation config: a training or a linear-probe one
    num_classes = int(config["data"]["num_classes"])
    if args.num_clusters is not None and args.num_clusters != num_classes:
        raise UserError(f"--num_clusters {args.num_clusters}: Hungarian matching needs as many clusters as classes "
                        f"(data.num_classes = {num_classes})")
    dataset = build_val_dataset(config)
    if dataset is None:
        raise UserError("config key data.val_list is not set: nothing to cluster")
    device = resolve_device(args.device)
    model = load_trained_model(config, args.model_path, device)
    try:
        result = evaluate_clusters(model, dataset, num_classes, class_names(config), device,
                                   args.num_clusters, args.max_fit_pixels, args.seed,
                                   int(config["data"]["num_workers"]))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(format_iou(result))
    if args.output:
        write_json(args.output, {**result, "mapping": {str(k): v for k, v in result["mapping"].items()}}, indent=1)
    return 0


def cli() -> None:
    """The `maskdistill-seg-eval-cluster` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
