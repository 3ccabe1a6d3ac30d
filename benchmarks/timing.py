"""Shared by the training benchmarks (bench_train_*.py): the flags (timed and warm-up iterations, device, CPU
threads) and the peak-memory lines."""
from __future__ import annotations

import argparse
import resource

import torch

from utils.distributed import resolve_device


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=30, help="timed training iterations (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def timing_device(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the --device to time on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def print_peak_memory(device: torch.device) -> None:
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
