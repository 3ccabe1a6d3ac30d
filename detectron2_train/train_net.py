r"""Train Mask R-CNN (torchvision) on COCO-JSON pseudo-masks or ground truth; infer; self-train.

Examples (from the repository root):
  python detectron2_train/train_net.py --config configs/detectron2/voc_class_agnostic.yaml \
      --train_json output/voc/pseudo_masks.json --train_root VOCdevkit --output_dir output/voc/round1
  torchrun --nproc_per_node 8 detectron2_train/train_net.py --config ... --resume
  python detectron2_train/train_net.py --config ... --eval_only --weights output/voc/model_final.pth \
      --test_json images.json --test_root DIR --results results.json
  python detectron2_train/train_net.py --config ... --pseudo_from results.json --score_thresh 0.7 \
      --train_json images.json --train_root DIR --output_dir output/round2
  python detectron2_train/train_net.py --config configs/detectron2/voc_class_agnostic.yaml --train_json \
      instances_train2017.json --seen_classes splits/A.txt --pseudo_json pa_masks.json --pseudo_topk 3 ...
      (GGN: the seen classes' annotations + the best pseudo-masks that cover something else)
  python detectron2_train/train_net.py --config ... --rounds 3 --score_thresh 0.7 0.8 \
      --train_json pseudo_masks.json --train_root DIR --test_json gt.json --test_root DIR --output_dir output/st
      (self-training: OUTPUT_DIR/round1, round2, round3; a rerun skips finished rounds)
  python detectron2_train/train_net.py --config configs/detectron2/cutler/cascade_mask_rcnn_r50.yaml \
      --round_config configs/detectron2/cutler/cascade_mask_rcnn_r50_self_train.yaml --rounds 3 \
      --score_thresh 0.7 0.65 --add_back_iou 0.5 --init_from_previous --train_json maskcut.json ...
      (CutLER: a detector on MaskCut masks, then two self-training rounds)
"""
import argparse
from pathlib import Path

from detectron2_train.parts import MASK_HEADS, STAGES
from utils.cli import add_device_arg, add_num_workers_arg, check_outputs, float_range, int_range, options_from
from utils.config import add_config_args
from utils.errors import UserError, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, config_help="YAML config (configs/detectron2/*.yaml); `_base_` chains are followed",
                    set_example="solver.base_lr=0.01 input.min_size_train=[512]",
                    output_dir_help="where checkpoints, metrics.jsonl and config.yaml go (config: output_dir)",
                    must_set={"data.train_json": "COCO dataset to train on (or --train_json)",
                              "data.train_root": "its image root (or --train_root)",
                              "data.test_json": "with --eval_only: the images to predict (or --test_json)",
                              "data.test_root": "with --eval_only: their image root (or --test_root)"},
                    example="python detectron2_train/train_net.py --config configs/detectron2/tiny_test.yaml "
                            "--train_json ../shared/data/tiny_coco/annotations/instances_train2017.json "
                            "--train_root ../shared/data/tiny_coco/train2017 --output_dir output/tiny --device cpu")
    p.add_argument("--train_json", help="COCO dataset to train on: pseudo-labels or ground truth (data.train_json)")
    p.add_argument("--train_root", help="image root of --train_json's file_name entries (data.train_root)")
    p.add_argument("--test_json", help="COCO dataset to predict after training / with --eval_only (its 'images' "
                                       "suffice); evaluated with pycocotools when it has annotations (data.test_json)")
    p.add_argument("--test_root", help="image root of --test_json (data.test_root)")
    p.add_argument("--class_agnostic", action="store_true", help="train one 'object' class (data.class_agnostic)")
    p.add_argument("--mask_head", choices=MASK_HEADS.names(), help=f"{MASK_HEADS.summaries()} (model.mask_head)")
    p.add_argument("--stage", choices=STAGES,
                   help="e2e: train everything (default); box: Faster R-CNN only (no mask loss); mask: load --weights "
                        "from the box stage, freeze backbone, RPN and box head, train the mask branch (model.stage)")
    p.add_argument("--mask_classes", metavar="A.txt",
                   help="class list of set A (one name or id per line): only these classes get a mask loss; "
                        "the others train boxes only (data.mask_classes)")
    p.add_argument("--seen_classes", metavar="A.txt",
                   help="class list (one name or id per line, e.g. make_split.py's A.txt): train on the annotations "
                        "of these classes only, class-agnostically (data.seen_classes)")
    p.add_argument("--pseudo_json", metavar="P.json",
                   help="GGN pseudo-masks with scores (gen_pa_masks.py output) for --train_json's images: per image, "
                        "the --pseudo_topk best with mask IoU < 0.5 to every annotated object join the class-agnostic "
                        "training set, written to OUTPUT_DIR/training_set.json (data.pseudo_json)")
    p.add_argument("--pseudo_topk", type=int_range(1), metavar="K",
                   help="with --pseudo_json: pseudo-masks kept per image (default 3) (data.pseudo_topk)")
    p.add_argument("--transfer_grad", action="store_true",
                   help="let the mask loss reach the box head through the transfer function "
                        "(ablation; default is stop-gradient) (model.transfer.grad)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --output_dir (model_final.pth or model_XXXXXXX.pth), "
                        "exactly; refused when it was made with other settings, weights or data "
                        "(solver.max_iter may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --output_dir that holds checkpoints (they and metrics.jsonl are deleted); "
                        "replace an existing --results file (with --eval_only: also the default one)")
    p.add_argument("--eval_only", action="store_true", help="no training: predict --test_json with --weights")
    p.add_argument("--weights", help="Mask R-CNN checkpoint: the model for --eval_only, or the initial weights "
                                     "for training (backbone weights are model.backbone_weights)")
    p.add_argument("--results", help="COCO results JSON to write (default OUTPUT_DIR/inference/results.json); "
                                     "an existing file is kept unless --overwrite")
    p.add_argument("--no_eval", action="store_true", help="write results but skip the pycocotools evaluation")
    p.add_argument("--pseudo_from", metavar="RESULTS.json",
                   help="self-training: make pseudo-labels for --train_json's images from these predictions, "
                        "write OUTPUT_DIR/pseudo_labels.json and train on it")
    p.add_argument("--score_thresh", type=float_range(0, 1), nargs="+", default=[0.7], metavar="T",
                   help="with --pseudo_from: keep predictions scoring at least T, or each image's best one when "
                        "none does (default 0.7); with --rounds: one T per round from round 2 on (the last "
                        "one repeats), e.g. --score_thresh 0.7 0.8")
    p.add_argument("--pseudo_only", action="store_true", help="with --pseudo_from: write the pseudo-labels and stop")
    p.add_argument("--rounds", type=int_range(1), default=None, metavar="N",
                   help="self-training in N rounds under OUTPUT_DIR/round1..roundN: round 1 trains on --train_json, "
                        "round n on round n-1's predictions on those images (--score_thresh); each round writes "
                        "model_final.pth, train_results.json and, with --test_json, its predictions and eval.json. "
                        "A rerun skips finished rounds and resumes the unfinished one; a round recorded with "
                        "other settings is refused unless --overwrite")
    p.add_argument("--round_set", nargs="+", action="extend", default=[], metavar="N:KEY=VALUE",
                   help="with --rounds: config overrides of round N only, e.g. --round_set 2:solver.max_iter=2000")
    p.add_argument("--init_from_previous", action="store_true",
                   help="with --rounds: start each round n > 1 from round n-1's weights (default: from the "
                        "backbone weights, as in round 1)")
    p.add_argument("--add_back_iou", type=float_range(0, 1), default=None, metavar="IOU",
                   help="with --rounds, CutLER's merge: keep the predictions scoring at least T (no best-one "
                        "fallback) and add back the previous round's pseudo-masks whose mask IoU with every kept "
                        "prediction is below IOU (CutLER: 0.5)")
    p.add_argument("--round_config", metavar="FILE",
                   help="with --rounds: the YAML config of rounds n > 1 instead of --config (the --set overrides "
                        "and flags apply to both), e.g. CutLER's self-training config")
    add_device_arg(p)
    add_num_workers_arg(p, None, help="data loading processes per training process, 0 = in the main process "
                                      "(data.num_workers)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict:
    """Defaults < YAML file < --set overrides < --output_dir and the explicit flags above (each checked)."""
    from detectron2_train.settings import TrainRequest, train_config

    return train_config(options_from(TrainRequest, vars(args)))


def round_settings(args: argparse.Namespace) -> list:
    """One RoundSettings per round from --rounds, --score_thresh, --round_set and --init_from_previous."""
    from detectron2_train import settings

    for flag in ("eval_only", "pseudo_from", "pseudo_only", "results"):
        if getattr(args, flag):
            raise UserError(f"--{flag} does not go with --rounds")
    values = vars(args)
    return settings.round_settings(options_from(settings.TrainRequest, values),
                                   options_from(settings.RoundsRequest, values))


def check_run_outputs(args: argparse.Namespace, cfg: dict) -> None:
    """Before any work: the output folder can be written, and a results file is not replaced unless --overwrite
    (an explicit --results; with --eval_only also the default one, which then belongs to no training run)."""
    results = args.results or (str(Path(cfg["output_dir"]) / "inference" / "results.json") if args.eval_only else None)
    check_outputs(results, overwrite=args.overwrite)
    if not args.eval_only:
        check_outputs(folders=[cfg["output_dir"]])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_from_args(args)
    rounds = round_settings(args) if args.rounds is not None else None
    if rounds is None and len(args.score_thresh) > 1:
        raise UserError("several --score_thresh values need --rounds")
    for flag in ("add_back_iou", "round_config"):
        if rounds is None and getattr(args, flag) is not None:
            raise UserError(f"--{flag} needs --rounds")
    if args.pseudo_topk is not None and not cfg["data"]["pseudo_json"]:
        raise UserError("--pseudo_topk needs --pseudo_json (the pseudo-masks it keeps the best K of per image)")
    check_run_outputs(args, cfg)
    from detectron2_train.engine import run
    from detectron2_train.self_training import self_training_rounds
    from utils.distributed import distributed_session

    with distributed_session(args.device) as info:
        if rounds is not None:
            self_training_rounds(cfg, info, rounds, init_weights=args.weights, evaluate=not args.no_eval,
                                 overwrite=args.overwrite)
        else:
            run(cfg, info, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only,
                weights=args.weights, pseudo_from=args.pseudo_from, score_thresh=args.score_thresh[0],
                pseudo_only=args.pseudo_only, results_path=args.results, evaluate=not args.no_eval)


def cli() -> None:
    """The `maskdistill-train-net` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
