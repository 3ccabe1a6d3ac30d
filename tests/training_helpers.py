"""Helpers for the kill-and-resume tests of every trainer (tests/test_*train*.py, tests/test_seg_probe.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import utils.training


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
