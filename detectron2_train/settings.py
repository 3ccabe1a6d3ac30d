"""The typed settings of a Mask R-CNN training run: what `train_net.py`'s flags stand for, so that a caller
(the pipeline) builds a run without a parser and gets what the command builds from the same flags.

    config = train_config(TrainRequest("configs/detectron2/tiny_test.yaml", train_json=..., train_root=...))
    rounds = round_settings(request, RoundsRequest(rounds=2, score_thresh=(0.7,)))

Torch is imported inside the functions (the config schema lives with the engine), so that `--help` stays quick.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from utils.config import run_config
from utils.errors import UserError


@dataclass(frozen=True)
class TrainRequest:
    """The config of a run: the YAML file, its `--set` overrides and the flags that set config keys
    (train_net.py's flags of the same names; None/False: not given, the config decides)."""

    config: str
    overrides: Sequence[str] = ()
    output_dir: str | None = None
    train_json: str | None = None
    train_root: str | None = None
    test_json: str | None = None
    test_root: str | None = None
    class_agnostic: bool = False
    mask_head: str | None = None
    stage: str | None = None
    mask_classes: str | None = None
    seen_classes: str | None = None
    pseudo_json: str | None = None
    pseudo_topk: int | None = None
    transfer_grad: bool = False
    num_workers: int | None = None


@dataclass(frozen=True)
class RoundsRequest:
    """Self-training in rounds (train_net.py's --rounds, --score_thresh, --round_set, --init_from_previous,
    --add_back_iou and --round_config)."""

    rounds: int
    score_thresh: Sequence[float] = (0.7,)  # one per round from round 2 on, the last one repeating
    round_set: Sequence[str] = ()  # "N:KEY=VALUE": overrides of round N only
    init_from_previous: bool = False
    add_back_iou: float | None = None
    round_config: str | None = None


def train_config(request: TrainRequest) -> dict:
    """Defaults < YAML file < overrides < the output folder and the explicit settings (each checked)."""
    from detectron2_train.engine import SCHEMA  # torch

    return run_config(request.config, request.overrides, SCHEMA, {
        "output_dir": request.output_dir,
        "data.train_json": request.train_json, "data.train_root": request.train_root,
        "data.test_json": request.test_json, "data.test_root": request.test_root,
        "data.mask_classes": request.mask_classes, "data.num_workers": request.num_workers,
        "data.seen_classes": request.seen_classes, "data.pseudo_json": request.pseudo_json,
        "data.pseudo_topk": request.pseudo_topk, "model.mask_head": request.mask_head, "model.stage": request.stage,
        "data.class_agnostic": True if request.class_agnostic else None,
        "model.transfer.grad": True if request.transfer_grad else None})


def round_settings(request: TrainRequest, rounds: RoundsRequest) -> list:
    """One `RoundSettings` per round: its score threshold, its own overrides, where it starts from, and the config
    of rounds after the first when `round_config` replaces the run's."""
    from detectron2_train.self_training import RoundSettings
    from utils.rounds import per_round

    overrides: dict[int, list[str]] = {}
    for item in rounds.round_set:
        number, _, override = item.partition(":")
        if not number.isdigit() or not 1 <= int(number) <= rounds.rounds or "=" not in override:
            raise UserError(f"--round_set {item!r} must look like N:KEY=VALUE with N in 1..{rounds.rounds}")
        overrides.setdefault(int(number), []).append(override)
    later_config = train_config(replace(request, config=rounds.round_config)) if rounds.round_config else None
    return [RoundSettings(score_thresh=per_round(rounds.score_thresh, max(n - 2, 0)),
                          overrides=tuple(overrides.get(n, [])), init_from_previous=rounds.init_from_previous,
                          add_back_iou=rounds.add_back_iou, config=later_config if n > 1 else None)
            for n in range(1, rounds.rounds + 1)]
