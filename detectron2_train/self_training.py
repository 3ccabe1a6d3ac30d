"""Self-training rounds: a model's COCO results become the next round's pseudo-labels
(detectron2_train/pseudo_labels.py: the filtering and CutLER's add-back).

`self_training_rounds` runs train -> predict -> filter -> retrain on the rounds of utils/rounds.py.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from detectron2_train.engine import SCHEMA, run_inference, train
from detectron2_train.pseudo_labels import write_pseudo_labels
from evaluation.coco_eval import EvalOptions, evaluate_instances, format_report
from utils.coco_io import load_coco_dataset, write_json
from utils.config import apply_overrides, nested, parse_override
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.rounds import Round, RoundSpec, run_rounds
from utils.training import HARMLESS_KEYS

SELF_TRAINING_KIND = "mask_rcnn_self_training_round"


@dataclass(frozen=True)
class RoundSettings:
    """What may change from one self-training round to the next (CutLER-style schedules).

    `score_thresh` turns the previous round's predictions into this round's pseudo-labels (unused in
    round 1, which trains on data.train_json); `overrides` are `--set`-style config overrides of this
    round only; `init_from_previous` starts from the previous round's weights instead of the backbone's;
    `add_back_iou` (CutLER: 0.5) adds back the previous round's pseudo-masks that overlap no kept
    prediction that much (`pseudo_labels.pseudo_label_dataset`); `config` is this round's whole config (e.g.
    CutLER's self-training config) instead of the shared one, before `overrides`.
    """
    score_thresh: float = 0.7
    overrides: tuple[str, ...] = ()
    init_from_previous: bool = False
    add_back_iou: float | None = None
    config: dict | None = None


def same_images(json_a: str | os.PathLike, json_b: str | os.PathLike) -> bool:
    """Whether two COCO files list the same images (ids and file names)."""
    def images(path: str | os.PathLike) -> list:
        return sorted((img["id"], img.get("file_name")) for img in load_coco_dataset(path)["images"])
    return Path(json_a).resolve() == Path(json_b).resolve() or images(json_a) == images(json_b)


def self_training_rounds(cfg: dict, info: DistInfo, rounds: Sequence[RoundSettings], init_weights: str | None = None,
                         evaluate: bool = True, iou_thresholds: Sequence[float] = (0.5, 0.7),
                         overwrite: bool = False) -> list[Round]:
    """Mask R-CNN in self-training rounds under cfg["output_dir"]/round<n>/ (utils/rounds.py).

    Round 1 trains on data.train_json; round n > 1 on round n-1's predictions on those images, filtered
    by its score threshold (`pseudo_labels.pseudo_label_dataset`; with `add_back_iou`, plus round n-1's own pseudo-masks
    that no kept prediction covers, as CutLER). Every round writes
      model_final.pth, train_results.json (predictions on data.train_json's images: the next round's seed,
      and the input of the segmentation stage), and, when data.test_json is set, its predictions
      (inference/results.json, or train_results.json when it lists the training images) and, with
      `evaluate`, eval.json (eval_instances.py's numbers: bbox and segm, mAP at `iou_thresholds`,
      class-agnostic when data.class_agnostic).
    Finished rounds are skipped; a round recorded with other settings is refused unless `overwrite`.
    """
    data = cfg["data"]
    for key in ("train_json", "train_root"):
        if not data.get(key):
            raise UserError(f"data.{key} is not set (use --{key} or --set data.{key}=...)")
    if data.get("test_json") and not data.get("test_root"):
        raise UserError("data.test_json is set but data.test_root is not")
    for number, settings in enumerate(rounds, start=1):
        for override in settings.overrides:  # checked as --set is: a typo or a bad value is refused here
            item = f"{number}:{override}"
            SCHEMA.check(nested(*parse_override(override, f"--round_set {item!r}")), f"--round_set {item}")
    for settings in rounds[1:]:
        if not 0.0 <= settings.score_thresh <= 1.0:
            raise UserError(f"--score_thresh must be in [0, 1], got {settings.score_thresh}")
        if settings.add_back_iou is not None and not 0.0 <= settings.add_back_iou <= 1.0:
            raise UserError(f"--add_back_iou must be in [0, 1], got {settings.add_back_iou}")
    round_configs = [{**apply_overrides(cfg if s.config is None else s.config, list(s.overrides)),
                      "output_dir": cfg["output_dir"]} for s in rounds]
    specs = []
    for number, (settings, round_cfg) in enumerate(zip(rounds, round_configs), start=1):
        chosen = {**round_cfg, "self_training": {
            "score_thresh": settings.score_thresh if number > 1 else None,
            "init": "previous round" if number > 1 and settings.init_from_previous else init_weights,
            "evaluate": evaluate, "iou_thresholds": list(iou_thresholds)}}
        if number > 1 and settings.add_back_iou is not None:  # recorded only when used: older rounds still match
            chosen["self_training"]["add_back_iou"] = settings.add_back_iou
        specs.append(RoundSpec(number, fingerprint(SELF_TRAINING_KIND, chosen, HARMLESS_KEYS)))

    def run_round(round: Round) -> dict:
        settings, round_cfg = rounds[round.number - 1], copy.deepcopy(round_configs[round.number - 1])
        round_cfg["output_dir"] = str(round.directory)
        weights = init_weights
        if round.previous is not None:
            pseudo_path = round.directory / "pseudo_labels.json"
            # the previous round's training set: data.train_json in round 1, its pseudo-labels later
            previous_json = (data["train_json"] if round.previous.previous is None
                             else round.previous.directory / "pseudo_labels.json")
            if info.is_main:
                dataset = write_pseudo_labels(round.previous.result["train_results"], data["train_json"],
                                              settings.score_thresh, pseudo_path, previous_json, settings.add_back_iou)
                print(f"round {round.number}: {len(dataset['annotations'])} pseudo-labels "
                      f"({dataset['info']['description']}) for {len(dataset['images'])} images in {pseudo_path}")
            barrier()
            round_cfg["data"]["train_json"] = str(pseudo_path)
            if settings.init_from_previous:
                weights = round.previous.result["checkpoint"]
        final = train(round_cfg, info, resume=True, init_weights=weights)
        train_results = round.directory / "train_results.json"
        run_inference(round_cfg, info, str(final), data["train_json"], data["train_root"], train_results)
        result = {"checkpoint": str(final), "train_results": str(train_results)}
        test_json = data.get("test_json")
        if not test_json:
            return result
        test_results = train_results
        if not same_images(test_json, data["train_json"]):
            test_results = round.directory / "inference" / "results.json"
            run_inference(round_cfg, info, str(final), test_json, data["test_root"], test_results)
        result["test_results"] = str(test_results)
        if evaluate and info.is_main:
            options = EvalOptions(iou_types=("bbox", "segm"), class_agnostic=bool(data["class_agnostic"]),
                                  iou_thresholds=tuple(iou_thresholds))
            report = evaluate_instances(test_results, test_json, options)
            write_json(round.directory / "eval.json", report.to_json(), indent=2)
            against = f"{test_results} against {report.reference}"
            metrics = report.metrics
            main_numbers = "; ".join(f"{t} AP {metrics[t]['AP'] or 0.0:.1f} AP50 {metrics[t]['AP50'] or 0.0:.1f}"
                                     for t in ("bbox", "segm"))
            print(f"round {round.number}: {against}\n{format_report(report)}\n"
                  f"round {round.number}: {main_numbers}: {against}")
            result["eval"] = str(round.directory / "eval.json")
        barrier()
        return result

    return run_rounds(cfg["output_dir"], specs, run_round, info, overwrite)
