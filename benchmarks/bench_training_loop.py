"""Overhead of the shared training loop (utils/training.py) and of settings fingerprints.

  python benchmarks/bench_training_loop.py            # CPU, ~1 min

Times the same tiny model and data through a bare PyTorch loop and through `TrainingRun.train`
(per-iteration reseeding, GradScaler, loss logging, progress): the difference is what the toolkit adds
per iteration. Also the per-iteration reseeding alone (against `torch.manual_seed`, which the old
Mask R-CNN loop called every iteration), the SHA-256 throughput of `utils.fingerprint.file_digest`
(run once per training start for every file the config names) and the peak RSS.
"""
import argparse
import os
import resource
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from utils.distributed import DistInfo
from utils.errors import run_cli
from utils.fingerprint import _digest, file_digest, fingerprint
from utils.samplers import resumable_loader
from utils.training import LoopSettings, TrainingRun, iteration_seed, seed_all


class Points(Dataset):
    def __init__(self, count: int = 256):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 16, generator=generator)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return self.x[index], self.y[index]


def step(model: nn.Module, batch) -> dict:
    x, y = batch
    return {"loss_mse": nn.functional.mse_loss(model(x), y)}


def bare_loop(iters: int) -> float:
    model = nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = iter(resumable_loader(Points(), 8, 0, 0, 1, 0, 0))
    start = time.perf_counter()
    for _ in range(iters):
        loss = sum(step(model, next(batches)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / iters


def toolkit_loop(iters: int, out: Path) -> float:
    model = nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loop = LoopSettings(max_iter=iters, log_period=20)
    run = TrainingRun(out, model, optimizer, None, loop, DistInfo(), config={}, fingerprint=fingerprint("bench", {}))
    run.prepare(resume=False, overwrite=True)
    loader = resumable_loader(Points(), 8, 0, 0, 1, 0, 0)
    start = time.perf_counter()
    run.train(step, loader)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000, help="iterations per timed run (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop; medians are printed")
    parser.add_argument("--hash_mib", type=int, default=256, help="size of the file hashed (MiB)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MASKDISTILL_PROGRESS_SECONDS", "0")  # no progress lines in the timings
    with tempfile.TemporaryDirectory() as tmp:
        bare_times, toolkit_times = [], []
        for i in range(args.repeats):  # interleaved, so that a change in the machine's load hits both
            bare_times.append(bare_loop(args.iters))
            toolkit_times.append(toolkit_loop(args.iters, Path(tmp) / f"run{i}"))
        bare, toolkit = statistics.median(bare_times), statistics.median(toolkit_times)
        print(f"bare loop:     {1e6 * bare:8.1f} us/iter")
        print(f"TrainingRun:   {1e6 * toolkit:8.1f} us/iter  (+{1e6 * (toolkit - bare):.1f} us/iter, "
              f"x{toolkit / bare:.2f})")
        calls = 2000
        reseed = timeit.timeit(lambda: seed_all(iteration_seed(0, 1, 12345)), number=calls) / calls
        torch_seed = timeit.timeit(lambda: torch.manual_seed(iteration_seed(0, 1, 12345)), number=calls) / calls
        print(f"reseed:        {1e6 * reseed:8.1f} us/iter  (torch.manual_seed alone: {1e6 * torch_seed:.1f} us)")
        big = Path(tmp) / "weights.bin"
        with open(big, "wb") as f:
            for _ in range(args.hash_mib):
                f.write(os.urandom(1 << 20))
        times = []
        for _ in range(args.repeats):
            _digest.cache_clear()
            start = time.perf_counter()
            file_digest(big)
            times.append(time.perf_counter() - start)
        print(f"file_digest:   {args.hash_mib / statistics.median(times):8.0f} MiB/s (sha256, {args.hash_mib} MiB file)")
    print(f"peak RSS:      {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB")


if __name__ == "__main__":
    run_cli(main)
