"""Resumable rounds: Mask R-CNN self-training, DeepLab-v3 + CRF refinement, any train-predict-retrain loop.

    rounds = [RoundSpec(number=n, settings=fingerprint("my_rounds", {...settings of round n...}))
              for n in (1, 2, 3)]
    results = run_rounds(root, rounds, run_round, info, overwrite=False)

    def run_round(round: Round) -> dict:        # works in round.directory; round.previous is the round before
        ...                                     # (its .directory and .result), None for the first one
        return {"checkpoint": ..., "AP50": ...}  # JSON: recorded, and handed to the next round

Round n lives in ROOT/round<n>/, with a marker ROOT/round<n>/round.json = {"round", "settings", "done",
"result"} written (atomically) before the round starts and again when it is done:

* a finished round with the same settings is skipped, and its recorded result is used;
* a round recorded with other settings is refused (one line naming the first difference), unless
  `overwrite`, which deletes its folder and runs it again;
* a round that runs anew makes the state of every later round stale (its input changed): they run again;
* an unfinished round with the same settings runs again in its folder, so the trainers resume inside it.

Settings are per round (e.g. another score threshold in each self-training round, CutLER style); they
should hold what the user chose for that round, not the outputs of earlier rounds (those are handled by
the staleness rule). ROOT/rounds.json lists every round's result at the end.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.coco_io import load_json, write_json
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import difference

MARKER = "round.json"
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


def _read_marker(path: Path) -> dict | None:
    return load_json(path, "round marker") if path.is_file() else None


def run_rounds(root: str | os.PathLike, specs: Sequence[RoundSpec], run_round: Callable[[Round], dict],
               info: DistInfo, overwrite: bool = False) -> list[Round]:
    """Run the rounds in order (see the module docstring); returns them with their results."""
    root = Path(root)
    done: list[Round] = []
    stale = False  # an earlier round ran anew: later finished rounds are out of date
    for spec in specs:
        current = Round(spec.number, round_directory(root, spec.number), spec.settings, done[-1] if done else None)
        marker_path = current.directory / MARKER
        marker = _read_marker(marker_path)
        if marker is not None:
            reason = difference(marker.get("settings"), spec.settings)
            if reason is not None and not overwrite:
                raise UserError(f"round {spec.number} in {current.directory}: {reason}; use the same settings, "
                                f"or --overwrite to run it again")
            if reason is not None or stale:
                if info.is_main:
                    shutil.rmtree(current.directory)
                barrier()
                marker = None
        if marker is not None and marker.get("done"):
            current.result = marker.get("result") or {}
            if info.is_main:
                print(f"round {spec.number}: already done in {current.directory}")
            done.append(current)
            continue
        if info.is_main:
            write_json(marker_path, {"round": spec.number, "settings": spec.settings, "done": False}, indent=1)
        barrier()
        current.result = run_round(current)
        if info.is_main:
            write_json(marker_path, {"round": spec.number, "settings": spec.settings, "done": True,
                                     "result": current.result}, indent=1)
        barrier()
        stale = True
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
