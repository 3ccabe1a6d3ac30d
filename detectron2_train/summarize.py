r"""Print AP / AP50 on set A and set B of finished MaskX R-CNN runs as one table (the paper's layout).

  python detectron2_train/summarize.py output/maskx/input_cls output/maskx/input_box output/maskx/input_cls_box

Each RUN_DIR is a train_net.py --output_dir holding model_final.pth, inference/results.json and
the set evaluations inference/eval_A.json and inference/eval_B.json written by
  python eval_instances.py --input_file RUN_DIR/inference/results.json --gt_file GT.json --iou_type both \
      --eval_classes $(cut -d' ' -f1 A.txt) --out_json RUN_DIR/inference/eval_A.json
(and the same with B.txt). inference/coco_eval.json, when present, fills the all-classes columns.
"""

import argparse

from detectron2_train.results_table import summarize_runs
from utils.errors import run_cli


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished train_net.py output directories")
    p.add_argument("--iou_type", choices=("segm", "bbox"), default="segm",
                   help="mask AP (segm, the paper's ablation tables) or box AP (default segm)")
    args = p.parse_args(argv)
    print(summarize_runs(args.run_dirs, args.iou_type))


def cli() -> None:
    """The `maskdistill-summarize` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
