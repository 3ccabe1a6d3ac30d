r"""Train GGN's pairwise-affinity (PA) predictor on the instance masks of the seen classes.

The checkpoint (OUTPUT_DIR/model_final.pth) drives gen_pa_masks.py --affinity; see docs/ggn.md.

Examples (from the repository root):
  python detectron2_train/make_split.py --gt_file coco/annotations/instances_train2017.json --out_dir splits
  python detectron2_train/train_affinity.py --config configs/affinity/ggn_voc.yaml \
      --train_json coco/annotations/instances_train2017.json --train_root coco/train2017 \
      --seen_classes splits/A.txt --output_dir output/pa
  torchrun --nproc_per_node 8 detectron2_train/train_affinity.py --config ... --resume
  python detectron2_train/train_affinity.py --config ... --val_json instances_val2017.json --val_root coco/val2017
      (held-back images: BCE and boundary F-score of the PA map next to the best constant map)
"""
import argparse

from utils.config import add_config_args, run_config_from_args
from utils.errors import run_cli

EXAMPLE = ("python detectron2_train/train_affinity.py --config configs/affinity/tiny_test.yaml "
           "--train_json ../shared/data/tiny_coco/annotations/instances_train2017.json "
           "--train_root ../shared/data/tiny_coco/train2017 --output_dir output/tiny_pa --device cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, config_help="YAML config (configs/affinity/*.yaml); `_base_` chains are followed",
                    set_example="solver.base_lr=0.01 input.min_size_train=[512]",
                    output_dir_help="where checkpoints, metrics.jsonl and config.yaml go (config: output_dir)",
                    must_set={"data.train_json": "COCO instances to learn the PA from (or --train_json)",
                              "data.train_root": "its image root (or --train_root)",
                              "data.seen_classes": "optional: the classes whose masks count (or --seen_classes)"},
                    example=EXAMPLE)
    p.add_argument("--train_json", help="COCO instances whose masks make the PA targets (data.train_json)")
    p.add_argument("--train_root", help="image root of --train_json's file_name entries (data.train_root)")
    p.add_argument("--seen_classes", metavar="A.txt",
                   help="class list (one name or id per line, e.g. make_split.py's A.txt): only these classes' "
                        "masks make the targets; images without one are left out (data.seen_classes; "
                        "default: every class)")
    p.add_argument("--val_json", help="held-back COCO instances scored during (solver.eval_period) and after "
                                      "training, with the seen classes' targets (data.val_json)")
    p.add_argument("--val_root", help="image root of --val_json (data.val_root)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --output_dir, exactly; refused when it was made with "
                        "other settings or data (solver.max_iter may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --output_dir that holds checkpoints (they and metrics.jsonl are deleted)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--num_workers", type=int, help="data loading processes per training process (data.num_workers)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from detectron2_train.affinity_engine import SCHEMA, train
    from utils.distributed import distributed_session

    cfg = run_config_from_args(args, SCHEMA, flags={
        "data.train_json": args.train_json, "data.train_root": args.train_root,
        "data.seen_classes": args.seen_classes, "data.val_json": args.val_json, "data.val_root": args.val_root,
        "data.num_workers": args.num_workers})
    with distributed_session(args.device) as info:
        result = train(cfg, info, resume=args.resume, overwrite=args.overwrite)
    if info.is_main:
        print(f"PA predictor: {result['checkpoint']}")


def cli() -> None:
    """The `maskdistill-train-affinity` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
