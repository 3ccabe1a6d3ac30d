"""Helpers for the kill-and-resume tests of every trainer (tests/test_*train*.py, tests/test_seg_probe.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
import torch

import utils.training
from utils.checkpoint import rng_states
from utils.errors import UserError

T = TypeVar("T")


class Killed(Exception):
    """Stands for the process being killed in the middle of training."""


def kill_after(monkeypatch: pytest.MonkeyPatch, iterations: int) -> None:
    """Make the next training run die when it asks for batch `iterations + 1` (after that many iterations)."""
    real = utils.training.worker_batches

    def dying(loader):
        batches = real(loader)
        for _ in range(iterations):
            yield next(batches)
        raise Killed(f"killed after {iterations} iterations")

    monkeypatch.setattr(utils.training, "worker_batches", dying)


def tear_metrics(path: Path) -> None:
    """Leave a last metrics line cut short, as a kill in the middle of a write does."""
    with open(path, "a") as f:
        f.write('{"iteration": 99, "total_lo')


def records(path: Path) -> list[dict]:
    """The metrics records without their timings (which differ from run to run)."""
    timings = {"time", "data_time", "max_mem_mb"}
    return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in path.read_text().splitlines()]


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    a = torch.load(path_a, weights_only=False)["model"]
    b = torch.load(path_b, weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def kill_and_resume(run: Callable[..., T], monkeypatch: pytest.MonkeyPatch, output_dir: Path,
                    iterations: int = 5, checkpoints: tuple[str, ...] = ("model_0000003.pth",)) -> T:
    """Kill `run()` after `iterations` (leaving `checkpoints` and a torn metrics line), check that a rerun
    without resume is refused, and return `run(resume=True)`."""
    kill_after(monkeypatch, iterations)
    with pytest.raises(Killed):
        run()
    monkeypatch.undo()
    assert sorted(p.name for p in output_dir.glob("*.pth")) == list(checkpoints)
    tear_metrics(output_dir / "metrics.jsonl")
    with pytest.raises(UserError, match="--resume"):
        run()
    return run(resume=True)


def copy_with_foreign_rng(checkpoint: Path, output_dir: Path) -> None:
    """Copy `checkpoint` into `output_dir` with someone else's RNG states: what every rank > 0 resumes
    from under torchrun, where only rank 0's states are saved."""
    output_dir.mkdir(parents=True)
    state = torch.load(checkpoint, weights_only=False)
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    state["rng"] = rng_states()
    torch.save(state, output_dir / checkpoint.name)


def assert_resumed_runs_match(straight: Path, resumed: Path, other: Path, killed_dir: Path, other_dir: Path) -> None:
    """A killed-and-resumed run and a rank resumed with foreign RNG states end with the weights and
    metrics log of an uninterrupted 6-iteration run (checkpoint at 3)."""
    assert_same_weights(straight, resumed)
    assert_same_weights(straight, other)
    straight_log = records(straight.parent / "metrics.jsonl")
    assert [r["iteration"] for r in straight_log] == [1, 2, 3, 4, 5, 6]
    assert records(killed_dir / "metrics.jsonl") == straight_log
    assert records(other_dir / "metrics.jsonl") == straight_log[3:]
