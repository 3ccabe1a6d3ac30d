"""Train DeepLab-v3 on images + pseudo-label PNGs.

Single process:   python segmentation/train.py --config configs/segmentation/deeplab_voc.yml
Several GPUs:     torchrun --nproc_per_node 4 segmentation/train.py --config ... --set solver.batch_size=16
Resume:           add --resume (continues from the latest model_XXXXXXX.pth in the output folder)
"""
import argparse

from segmentation.settings import SCHEMA, TINY_EXAMPLE, TRAIN_KEYS
from utils.cli import check_outputs
from utils.config import add_config_args, run_config_from_args
from utils.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train DeepLab-v3 (dilated ResNet, ASPP head) on semantic "
                                                 "pseudo-labels; launch with torchrun for several processes.")
    add_config_args(parser, config_help="YAML config (e.g. configs/segmentation/deeplab_voc.yml)",
                    set_example="solver.max_iter=1000 model.weights=none",
                    output_dir_help="output folder (overrides the config's output_dir)",
                    device_help="auto (default: CUDA when available), cpu, cuda; overrides the config's device",
                    must_set=TRAIN_KEYS, example=TINY_EXAMPLE.format(script="segmentation/train.py"))
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output folder (exact: same result as "
                             "an uninterrupted run); starts fresh when there is none; refused when the "
                             "checkpoint was made with other settings, weights or data")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the checkpoints and metrics already in the output folder and start over")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = run_config_from_args(args, SCHEMA)
    check_outputs(folders=[config["output_dir"]])
    from segmentation.engine import train  # torch: after parsing, so that --help stays quick
    from utils.distributed import distributed_session

    with distributed_session(config["device"]) as dist:
        result = train(config, dist, resume=args.resume, overwrite=args.overwrite)
    if dist.is_main:
        print(f"finished at iteration {result['iteration']}; model: {result['checkpoint']}")
    return 0


def cli() -> None:
    """The `maskdistill-seg-train` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
