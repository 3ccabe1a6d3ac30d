"""CPU worker processes: the one pool of the project (`worker_pool`), a map over it with a progress bar
(`run_pool`), and the one default-worker rule (`default_workers`).

    with worker_pool(4) as pool:                     # fork where there is fork, else spawn
        pending = pool.map_async(finish_image, jobs)
    results = run_pool(refine, jobs, workers=None, desc="crf")   # None: default_workers()
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
from typing import Callable

from utils.progress import progress


def init_worker() -> None:
    """Every pool worker: one torch thread (the workers already share the cores) and no SIGINT, so that an
    interrupt reaches the main process alone, which stops the pool."""
    if "torch" in sys.modules:  # imported by the parent: fork shares it; a spawned worker imports none
        sys.modules["torch"].set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool of `workers` processes (`init_worker` in each); use it as a context manager.

    fork starts workers without re-importing anything (as DataLoader workers do); spawn where there is no fork.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=init_worker)


def run_pool(function: Callable, jobs: list, workers: int | None, desc: str, show_progress: bool = True) -> list:
    """Map `function` over `jobs` with a pool of CPU processes (in-process for one worker), with a progress bar.

    Results come in completion order. `show_progress=False` hides the bar (for callers that keep their own).
    """
    workers = default_workers(None if workers is None else max(1, int(workers)))
    results = []
    if workers == 1 or len(jobs) <= 1:
        for job in progress(jobs, desc=desc, unit="img", enabled=show_progress):
            results.append(function(job))
        return results
    with worker_pool(min(workers, len(jobs))) as pool:
        for result in progress(pool.imap_unordered(function, jobs, chunksize=1), total=len(jobs), desc=desc,
                               unit="img", enabled=show_progress):
            results.append(result)
    return results


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_workers(requested: int | None = None, at_most: int = 16, spare: int = 0, at_least: int = 1) -> int:
    """`requested` when given; else the available CPUs less `spare`, at most `at_most` and at least `at_least`.

    The commands' rules, as their --help states them: CRF pools `default_workers()` (available cores, at most
    16); gen_masks' post-processing `default_workers(n, at_most=8)` (min(8, CPUs)); decoding and grouping
    workers `default_workers(n, at_most=4, spare=1, at_least=0)` (min(4, CPUs - 1), 0 = the main process).
    """
    if requested is not None:
        return requested
    return max(at_least, min(available_cpus() - spare, at_most))
