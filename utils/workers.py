"""A pool of CPU worker processes with a progress bar, and the default number of workers."""
from __future__ import annotations

import multiprocessing
import os
from typing import Callable

from utils.progress import progress


def run_pool(function: Callable, jobs: list, workers: int | None, desc: str, show_progress: bool = True) -> list:
    """Map `function` over `jobs` with a pool of CPU processes (in-process for one worker), with a progress bar.

    Results come in completion order. `show_progress=False` hides the bar (for callers that keep their own).
    """
    workers = default_workers() if workers is None else max(1, int(workers))
    results = []
    if workers == 1 or len(jobs) <= 1:
        for job in progress(jobs, desc=desc, unit="img", enabled=show_progress):
            results.append(function(job))
        return results
    # fork starts workers without re-importing anything (as DataLoader workers do); spawn where there is no fork.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(min(workers, len(jobs))) as pool:
        for result in progress(pool.imap_unordered(function, jobs, chunksize=1), total=len(jobs), desc=desc,
                               unit="img", enabled=show_progress):
            results.append(result)
    return results


def default_workers() -> int:
    try:
        return max(1, min(len(os.sched_getaffinity(0)), 16))
    except AttributeError:
        return max(1, min(os.cpu_count() or 1, 16))
