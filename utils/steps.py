"""Resumable steps: a chain of jobs, each writing into its own folder, skipped when already done alike.

    steps = [Step("masks", {"method": "maskdistill"}, run_masks),
             Step("cluster", {"num_classes": 20}, run_cluster, inputs=("masks",))]
    records = run_steps(Path("out"), steps)     # out/masks/, out/cluster/, each with step.json

A step's fingerprint (utils/fingerprint.py) covers its settings (files named by a setting count by their
content) and the fingerprints of the steps it reads (`inputs`), so a changed setting reruns that step and
every step downstream of it, and nothing else. `OUT/<step>/step.json` records the fingerprint, whether
the step finished, its result (a JSON dict: paths, metrics) and its time. A rerun skips a finished step
whose fingerprint agrees; otherwise the step's folder is emptied and the step runs again (an interrupted
step restarts from nothing, or resumes by itself when its job can: the folder is only emptied when
the settings changed). The step's `run` gets its folder and the results of the steps before it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from utils.coco_io import load_json, write_json
from utils.errors import UserError
from utils.fingerprint import difference, fingerprint

MARKER = "step.json"


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
    missing = [name for name in step.inputs if name not in upstream]
    if missing:
        raise ValueError(f"step {step.name!r} reads {missing[0]!r}, which does not run before it")
    inputs = {name: fingerprint_digest(upstream[name]) for name in step.inputs}
    return fingerprint(step.name, {"settings": dict(step.settings), "inputs": inputs})


def _read_marker(path: Path) -> dict | None:
    try:
        marker = load_json(path)
    except (UserError, OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def run_steps(root: str | Path, steps: Sequence[Step], log: Callable[[str], None] = print) -> list[StepRecord]:
    """Run `steps` in order under `root/<name>/`, skipping those finished with the same fingerprint."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names must be distinct: {names}")
    root = Path(root)
    prints: dict[str, dict] = {}
    results: dict[str, dict] = {}
    records: list[StepRecord] = []
    for step in steps:
        current = step_fingerprint(step, prints)
        prints[step.name] = current
        directory = root / step.name
        marker = _read_marker(directory / MARKER)
        reason = "new" if marker is None else difference(marker.get("fingerprint"), current)
        if marker is not None and reason is None and marker.get("done"):
            log(f"[{step.name}] already done, skipped ({directory})")
            results[step.name] = marker.get("result") or {}
            records.append(StepRecord(step.name, "skipped", directory, dict(step.settings), results[step.name],
                                      float(marker.get("seconds", 0.0)), "", current))
            continue
        if reason is None:
            reason = "unfinished"  # same settings, interrupted: the job may resume from what it left
        elif directory.exists():
            shutil.rmtree(directory)  # made with other settings or inputs: nothing of it may be reused
        log(f"[{step.name}] running ({reason})")
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / MARKER, {"step": step.name, "fingerprint": current, "done": False}, indent=1)
        start = time.perf_counter()
        result = step.run(directory, dict(results))
        seconds = time.perf_counter() - start
        write_json(directory / MARKER, {"step": step.name, "fingerprint": current, "done": True,
                                        "result": result, "seconds": seconds}, indent=1)
        log(f"[{step.name}] done in {seconds:.1f} s")
        results[step.name] = result
        records.append(StepRecord(step.name, "ran", directory, dict(step.settings), result, seconds, reason, current))
    return records
