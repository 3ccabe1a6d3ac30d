"""Iterative DeepLab-v3 + dense-CRF rounds: train, predict the training set, CRF-refine, write labels, retrain.

    python segmentation/train_plus_crf.py --config configs/segmentation/deeplab_voc.yml --rounds 1

Each round lives in OUTPUT_DIR/round<r>/ (its labels in round<r>/labels/); rerunning skips finished rounds
and resumes where it stopped, and refuses rounds recorded with other settings (--overwrite reruns them).
Works under torchrun like segmentation/train.py.
"""
import argparse

from segmentation.settings import TINY_EXAMPLE, TRAIN_KEYS, run_settings
from utils.cli import check_outputs, int_range
from utils.config import add_config_args
from utils.errors import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train DeepLab-v3 in rounds, each on the dense-CRF-refined "
                                                 "predictions of the previous round's model.")
    add_config_args(parser, config_help="YAML config, as for segmentation/train.py",
                    set_example="solver.max_iter=1000",
                    output_dir_help="root folder of the rounds (overrides the config's output_dir)",
                    device_help="auto (default), cpu or cuda; overrides the config's device",
                    must_set=TRAIN_KEYS, example=TINY_EXAMPLE.format(script="segmentation/train_plus_crf.py"))
    parser.add_argument("--rounds", type=int_range(0), default=None,
                        help="refinement rounds after the first training, 0 = train only (default: crf_rounds.rounds "
                             "of the config, else 1)")
    parser.add_argument("--workers", type=int_range(1), default=None,
                        help="CPU processes for the CRF (default: cores / processes)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rerun rounds recorded with other settings (their folders are deleted) instead of refusing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = run_settings(args.config, args.overrides, args.output_dir, args.device)
    check_outputs(folders=[config["output_dir"]])
    rounds = args.rounds if args.rounds is not None else int(config["crf_rounds"]["rounds"])
    from utils.crf import CRFParams  # torch: after parsing, so that --help stays quick
    from segmentation.rounds import train_plus_crf
    from utils.distributed import distributed_session

    with distributed_session(config["device"]) as dist:
        result = train_plus_crf(config, dist, rounds, args.workers, CRFParams(), args.overwrite)
    if dist.is_main:
        for r in result["rounds"]:
            print(f"round {r['round']}: labels {r['labels']} -> {r['checkpoint']}")
    return 0


def cli() -> None:
    """The `maskdistill-seg-train-plus-crf` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
