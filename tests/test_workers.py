"""utils/workers.py: the one default-worker rule gives each command what its --help says, and the one pool's
workers run one torch thread and leave interrupts to the main process."""
from __future__ import annotations

import signal

import pytest
import torch

import utils.workers as workers
from utils.workers import default_workers, run_pool, worker_pool


@pytest.mark.parametrize("cpus,crf,post,decode", [(1, 1, 1, 0), (2, 2, 2, 1), (6, 6, 6, 4), (12, 12, 8, 4),
                                                  (32, 16, 8, 4)])
def test_default_workers_follow_each_documented_rule(monkeypatch, cpus, crf, post, decode):
    monkeypatch.setattr(workers, "available_cpus", lambda: cpus)
    assert default_workers() == crf                                      # available cores, at most 16
    assert default_workers(None, at_most=8) == post                      # min(8, CPUs)
    assert default_workers(None, at_most=4, spare=1, at_least=0) == decode  # min(4, CPUs - 1)
    assert default_workers(0, at_most=4, spare=1, at_least=0) == 0 and default_workers(3) == 3  # as asked


def _worker_state(_: int) -> tuple:
    return torch.get_num_threads(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_pool_workers_run_one_thread_and_ignore_interrupts():
    with worker_pool(2) as pool:
        assert pool.map(_worker_state, [0, 1]) == [(1, True), (1, True)]
    assert sorted(run_pool(_square, [1, 2, 3], workers=2, desc="t", show_progress=False)) == [1, 4, 9]


def _square(x: int) -> int:
    return x * x
