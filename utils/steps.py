"""Resumable steps: a chain of jobs, each writing into its own folder, skipped when already done alike.

    steps = [Step("masks", {"method": "maskdistill"}, run_masks),
             Step("cluster", {"num_classes": 20}, run_cluster, inputs=("masks",))]
    records = run_steps(Path("out"), steps)     # out/masks/, out/cluster/, each with step.json

A step's fingerprint (utils/fingerprint.py) covers its settings (files named by a setting count by their
content) and the fingerprints of the steps it reads (`inputs`), so a changed setting reruns that step and
every step downstream of it, and nothing else. `OUT/<step>/step.json` records the fingerprint, whether
the step finished, its result (a JSON dict: paths, metrics) and its time. The steps are resumable units
(utils/resumable.py, as training rounds are): a rerun skips a finished step whose fingerprint agrees and
resumes an unfinished one in its folder; a step whose settings changed is refused, naming the step and
the first difference, unless `overwrite`, which empties its folder and reruns it and the steps that read
it. The step's `run` gets its folder and the results of the steps before it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.fingerprint import fingerprint
from utils.resumable import MarkerFormat, Unit, begin, finish, plan

MARKER = "step.json"
MARKER_FORMAT = MarkerFormat(MARKER, "fingerprint")


@dataclass
class Step:
    """One job of the chain: `run(folder, results)` -> its result (JSON-serialisable dict)."""

    name: str
    settings: Mapping[str, Any]
    run: Callable[[Path, dict[str, dict]], dict]
    inputs: Sequence[str] = ()  # names of earlier steps whose outputs this one reads


@dataclass
class StepRecord:
    """What happened to one step in this call of `run_steps`."""

    name: str
    status: str  # "ran" or "skipped"
    directory: Path
    settings: dict
    result: dict
    seconds: float  # of the run that made the result (a skipped step keeps its recorded time)
    reason: str = ""  # why it ran: "new", or how its fingerprint differed
    fingerprint: dict = field(default_factory=dict)


def fingerprint_digest(print_: dict) -> str:
    """A short stable digest of a fingerprint, for the steps downstream to depend on."""
    return hashlib.sha256(json.dumps(print_, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_fingerprint(step: Step, upstream: Mapping[str, dict]) -> dict:
    """`step`'s fingerprint: its settings and the digests of the fingerprints of its inputs."""
    missing = [name for name in step.inputs if name not in upstream]  # not yet run, or not a step
    if missing:
        raise ValueError(f"step {step.name!r} reads {missing[0]!r}, which does not run before it")
    inputs = {name: fingerprint_digest(upstream[name]) for name in step.inputs}
    return fingerprint(step.name, {"settings": dict(step.settings), "inputs": inputs})


def run_steps(root: str | Path, steps: Sequence[Step], log: Callable[[str], None] = print, overwrite: bool = False,
              flag: str = "--overwrite") -> list[StepRecord]:
    """Run `steps` in order under `root/<name>/`, skipping those finished with the same fingerprint.

    A step recorded with another fingerprint is refused before any step runs (naming `flag`), unless
    `overwrite` (utils/resumable.py)."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names must be distinct: {names}")
    root = Path(root)
    prints: dict[str, dict] = {}
    units = []
    for step in steps:
        prints[step.name] = step_fingerprint(step, prints)
        units.append(Unit(f"step {step.name}", root / step.name, prints[step.name], {"step": step.name},
                          inputs=[names.index(name) for name in step.inputs]))
    results: dict[str, dict] = {}
    records: list[StepRecord] = []
    for step, decision in zip(steps, plan(units, MARKER_FORMAT, overwrite, flag)):
        directory, current = decision.unit.directory, decision.unit.fingerprint
        if not decision.run:
            log(f"[{step.name}] already done, skipped ({directory})")
            results[step.name] = decision.result
            records.append(StepRecord(step.name, "skipped", directory, dict(step.settings), decision.result,
                                      float(decision.marker.get("seconds", 0.0)), "", current))
            continue
        log(f"[{step.name}] running ({decision.reason})")
        begin(decision, MARKER_FORMAT)
        start = time.perf_counter()
        result = step.run(directory, dict(results))
        seconds = time.perf_counter() - start
        finish(decision.unit, MARKER_FORMAT, {"result": result, "seconds": seconds})
        log(f"[{step.name}] done in {seconds:.1f} s")
        results[step.name] = result
        records.append(StepRecord(step.name, "ran", directory, dict(step.settings), result, seconds, decision.reason,
                                  current))
    return records
