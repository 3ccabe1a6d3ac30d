"""Resumable rounds: Mask R-CNN self-training, DeepLab-v3 + CRF refinement, any train-predict-retrain loop.

    rounds = [RoundSpec(number=n, settings=fingerprint("my_rounds", {...settings of round n...}))
              for n in (1, 2, 3)]
    results = run_rounds(root, rounds, run_round, info, overwrite=False)

    def run_round(round: Round) -> dict:        # works in round.directory; round.previous is the round before
        ...                                     # (its .directory and .result), None for the first one
        return {"checkpoint": ..., "AP50": ...}  # JSON: recorded, and handed to the next round

Round n lives in ROOT/round<n>/, with a marker ROOT/round<n>/round.json = {"round", "settings", "done",
"result"} written (atomically) before the round starts and again when it is done. Rounds are resumable
units (utils/resumable.py, as pipeline steps are), each reading the round before it:

* a finished round with the same settings is skipped, and its recorded result is used;
* a round recorded with other settings is refused before any round runs (one line naming the round and
  the first difference), unless `overwrite`, which deletes its folder and runs it again;
* a round that runs anew makes the state of every later round stale (its input changed): they run again;
* an unfinished round with the same settings runs again in its folder, so the trainers resume inside it.

Settings are per round (e.g. another score threshold in each self-training round, CutLER style); they
should hold what the user chose for that round, not the outputs of earlier rounds (those are handled by
the staleness rule). ROOT/rounds.json lists every round's result at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.coco_io import write_json
from utils.distributed import DistInfo, barrier
from utils.resumable import MarkerFormat, Unit, begin, finish, plan

MARKER = "round.json"
MARKER_FORMAT = MarkerFormat(MARKER, "settings")
SUMMARY = "rounds.json"


@dataclass
class RoundSpec:
    number: int
    settings: dict  # a fingerprint (utils/fingerprint.py) of what was chosen for this round


@dataclass
class Round:
    number: int
    directory: Path
    settings: dict
    previous: "Round | None" = None
    result: dict = field(default_factory=dict)


def round_directory(root: str | os.PathLike, number: int) -> Path:
    return Path(root) / f"round{number}"


def run_rounds(root: str | os.PathLike, specs: Sequence[RoundSpec], run_round: Callable[[Round], dict],
               info: DistInfo, overwrite: bool = False) -> list[Round]:
    """Run the rounds in order (see the module docstring); returns them with their results."""
    root = Path(root)
    units = [Unit(f"round {spec.number}", round_directory(root, spec.number), spec.settings, {"round": spec.number},
                  inputs=[index - 1] if index else []) for index, spec in enumerate(specs)]
    done: list[Round] = []
    for spec, decision in zip(specs, plan(units, MARKER_FORMAT, overwrite)):
        current = Round(spec.number, decision.unit.directory, spec.settings, done[-1] if done else None)
        if not decision.run:
            current.result = decision.result
            if info.is_main:
                print(f"round {spec.number}: already done in {current.directory}")
            done.append(current)
            continue
        begin(decision, MARKER_FORMAT, info.is_main, barrier)
        current.result = run_round(current)
        finish(decision.unit, MARKER_FORMAT, {"result": current.result}, info.is_main, barrier)
        done.append(current)
    if info.is_main:
        write_json(root / SUMMARY, [{"round": r.number, "directory": str(r.directory), **r.result} for r in done],
                   indent=1)
    return done


def per_round(values: Sequence[Any], index: int) -> Any:
    """The value of a per-round list for round `index` (0-based); the last value repeats for later rounds."""
    if not values:
        raise ValueError("per_round needs at least one value")
    return values[min(index, len(values) - 1)]
