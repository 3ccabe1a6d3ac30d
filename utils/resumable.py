"""Resumable units: the one mechanism under pipeline steps (utils/steps.py) and training rounds (utils/rounds.py).

A unit is a job that works in a folder of its own and records there, in a marker file, the fingerprint
(utils/fingerprint.py) of what made it and whether it finished. Before anything runs, `plan` reads every
unit's marker and decides, the same way for steps and rounds:

* a finished unit with the same fingerprint is skipped (its recorded result is used), unless it is stale;
* an unfinished unit with the same fingerprint runs again in its folder, so that its job resumes there;
* a unit recorded with another fingerprint (or a non-empty folder without a readable marker) is REFUSED,
  with one line naming the unit and the first difference, unless `overwrite`: then its folder is
  deleted and it runs anew;
* a unit that runs makes every unit reading it (`Unit.inputs`, followed on) stale: those run again from
  an empty folder, as their input changed.

A refusal comes from `plan`, before any unit runs or any file changes. Then, per unit that runs, `begin`
empties its folder when its old content may not be reused and writes the unfinished marker, and `finish`
writes the finished one. Under torchrun only rank 0 writes (`is_main`) and `sync` is the barrier.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from utils.coco_io import load_json, write_json
from utils.errors import UserError
from utils.fingerprint import difference

NEW, UNFINISHED, STALE = "new", "unfinished", "an input it reads runs again"


@dataclass(frozen=True)
class MarkerFormat:
    """The marker of a kind of unit: its file name in the unit's folder, and the key holding the fingerprint
    (each kind keeps the layout it has always had, so folders made before still resume)."""

    file: str
    fingerprint_key: str


@dataclass
class Unit:
    label: str  # how messages name it: "step masks", "round 2"
    directory: Path
    fingerprint: dict
    identity: dict  # recorded in the marker besides the fingerprint: {"step": "masks"}, {"round": 2}
    inputs: Sequence[int] = ()  # indices of the earlier units whose outputs it reads


@dataclass
class Decision:
    """What `plan` decided for one unit: `run` it (why: `reason`) or skip it (`result` is its recorded one)."""

    unit: Unit
    run: bool
    reason: str = ""  # NEW, UNFINISHED, STALE, or how the fingerprint differs (the folder is then emptied)
    result: dict = field(default_factory=dict)
    marker: dict = field(default_factory=dict)  # the finished unit's marker, for a skip

    @property
    def reuses_folder(self) -> bool:
        return self.reason in (NEW, UNFINISHED)


def read_marker(path: Path) -> dict | None:
    """The marker at `path`, or None when there is none or it cannot be read as a JSON object."""
    if not path.is_file():
        return None
    try:
        marker = load_json(path)
    except (UserError, OSError):
        return None
    return marker if isinstance(marker, dict) else None


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def plan(units: Sequence[Unit], marker: MarkerFormat, overwrite: bool, flag: str = "--overwrite") -> list[Decision]:
    """Decide for every unit (see the module docstring); a UserError for the first one recorded otherwise,
    unless `overwrite`."""
    decisions: list[Decision] = []
    for index, unit in enumerate(units):
        if any(i >= index for i in unit.inputs):
            raise ValueError(f"{unit.label} reads a unit that does not run before it")
        recorded = read_marker(unit.directory / marker.file)
        if recorded is None:
            reason = difference(None, unit.fingerprint) if _has_files(unit.directory) else NEW
        else:
            reason = difference(recorded.get(marker.fingerprint_key), unit.fingerprint)
        if reason not in (None, NEW) and not overwrite:
            raise UserError(f"{unit.label} in {unit.directory}: {reason}; use the same settings, or {flag} to run it "
                            "again")
        stale = any(decisions[i].run for i in unit.inputs)
        if reason is None and recorded.get("done") and not stale:
            decisions.append(Decision(unit, False, result=recorded.get("result") or {}, marker=recorded))
        else:
            decisions.append(Decision(unit, True, reason or (STALE if stale else UNFINISHED)))
    return decisions


def begin(decision: Decision, marker: MarkerFormat, is_main: bool = True, sync: Callable[[], None] = lambda: None
          ) -> None:
    """Before a unit runs: empty its folder unless it is new or resumes, and write its unfinished marker."""
    unit = decision.unit
    if is_main:
        if not decision.reuses_folder and unit.directory.exists():
            shutil.rmtree(unit.directory)  # made with other settings or inputs: nothing of it may be reused
        unit.directory.mkdir(parents=True, exist_ok=True)
        write_json(unit.directory / marker.file,
                   {**unit.identity, marker.fingerprint_key: unit.fingerprint, "done": False}, indent=1)
    sync()


def finish(unit: Unit, marker: MarkerFormat, record: dict[str, Any], is_main: bool = True,
           sync: Callable[[], None] = lambda: None) -> None:
    """After a unit ran: its finished marker, with `record` (its result, its time)."""
    if is_main:
        write_json(unit.directory / marker.file,
                   {**unit.identity, marker.fingerprint_key: unit.fingerprint, "done": True, **record}, indent=1)
    sync()
