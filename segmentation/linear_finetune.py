"""Linear-probe evaluation (as in MaskDistill): freeze the trained DeepLab-v3, train a 1x1 conv on VOC GT, report mIoU.

    python segmentation/linear_finetune.py --config_env configs/segmentation/env.yml \\
        --config_exp configs/segmentation/linear_voc.yml [--crf-postprocess]
    python segmentation/linear_finetune.py ... --model_path outputs/segmentation/linear_voc/probe_final.pth

Results go to <root_dir of config_env>/<config_exp name>/ (results.json, metrics.jsonl, checkpoints);
training resumes automatically from the latest checkpoint there when it was made with the same settings,
`pretrained` network and data (anything else is refused); an existing results.json needs --overwrite.
"""
import argparse
from pathlib import Path

from utils.cli import DEVICE_CHOICES, add_device_arg, check_outputs, int_range
from utils.config import config_epilog
from utils.errors import run_cli


PROBE_KEYS = {"pretrained": "the trained DeepLab-v3 checkpoint to probe (model_final.pth)",
              "data.image_dir": "training images", "data.label_dir": "their ground-truth PNGs",
              "data.train_list": "image list of the training set", "data.val_list": "val image list",
              "data.val_label_dir": "val ground-truth PNGs"}
_VOC_MINI = "../shared/data/voc_mini/VOCdevkit/VOC2012"
PROBE_EXAMPLE = ("python segmentation/linear_finetune.py --config_exp configs/segmentation/tiny_linear_voc.yml "
                 "--set pretrained=outputs/segmentation/tiny_test/model_final.pth "
                 f"data.image_dir={_VOC_MINI}/JPEGImages data.label_dir={_VOC_MINI}/SegmentationClass "
                 f"data.train_list={_VOC_MINI}/ImageSets/Segmentation/trainval.txt "
                 f"data.val_label_dir={_VOC_MINI}/SegmentationClass data.val_list={_VOC_MINI}/ImageSets/Segmentation/val.txt")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fully-supervised linear probe: freeze the network, train only "
                                                 "the final 1x1 convolution on ground-truth labels, report mIoU "
                                                 "and per-class IoU on val.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=config_epilog(PROBE_KEYS, PROBE_EXAMPLE))
    parser.add_argument("--config_env", default=None,
                        help="environment YAML with root_dir (output root); default: the config_exp's output_dir")
    parser.add_argument("--config_exp", required=True,
                        help="experiment YAML: data, model, solver and 'pretrained' (the trained DeepLab-v3 checkpoint)")
    parser.add_argument("--crf-postprocess", dest="crf_postprocess", action="store_true",
                        help="refine the val softmax with the dense CRF before scoring")
    parser.add_argument("--workers", type=int_range(1), default=None,
                        help="CPU processes for --crf-postprocess (default: available cores, at most 16)")
    parser.add_argument("--model_path", default=None,
                        help="evaluate these saved probe weights (probe_final.pth) instead of training")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys (values parsed as YAML; --set may be repeated, all apply in order), "
                             "e.g. --set solver.max_iter=100 data.num_workers=0")
    add_device_arg(parser, default=None, help=f"{DEVICE_CHOICES}; overrides the config's device (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing results.json / results_crf.json, and train the probe again "
                             "from scratch (its checkpoints and metrics.jsonl are deleted)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from segmentation.probe import load_probe_config, run_linear_probe  # torch: after parsing (quick --help)
    from utils.distributed import distributed_session

    config = load_probe_config(args.config_env, args.config_exp, args.overrides)
    if args.device:
        config["device"] = args.device
    check_outputs(folders=[config["output_dir"]])
    with distributed_session(config["device"]) as dist:
        result = run_linear_probe(config, dist, args.model_path, args.crf_postprocess, args.workers,
                                  args.overwrite)
    if dist.is_main:
        print(f"results written to {Path(config['output_dir'])}; mIoU {100 * result['mIoU']:.2f}")
    return 0


def cli() -> None:
    """The `maskdistill-seg-linear-finetune` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
