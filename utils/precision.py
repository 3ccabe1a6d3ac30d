"""Inference precision: `--precision auto|fp32|bf16`, decided once, in one place, for every stage.

`auto` takes whichever precision is faster on the hardware at hand, never a CPU flag alone (a CPU
with avx512_bf16 but no AMX can run a ViT slower in bf16 than in fp32; docs/benchmarks.md):

* CUDA: bf16 when the GPU supports it (`torch.cuda.is_bf16_supported()`, Ampere and newer).
* CPU: measured (`measure_precisions`): one backbone forward at the job's shape in each precision,
  after a warm-up, alternating; bf16 only when it is at least `BF16_MARGIN` faster (fp32 is exact,
  so near-ties go to it). The result is cached per CPU model, torch version and the caller's key
  (arch, input shape) in `$MASKDISTILL_CACHE/precision.json` (default ~/.cache/maskdistill), so a
  machine decides once and resumes of a run see the same choice. A caller with no forward to time
  gets fp32.
* any other device: fp32.

Every decision comes with its reason (`PrecisionChoice`), for the log and the recorded settings.
bf16 means autocast: weights stay fp32, matrix products and convolutions run in bf16.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from utils.coco_io import write_json
from utils.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MARGIN = 0.95  # bf16 is taken on a CPU when its forward takes at most this share of fp32's
TIMED_RUNS = 2  # timed forwards per precision (alternating, after one warm-up each); the fastest counts


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved precision and why it was chosen (logged and recorded with the run's settings)."""

    name: str  # 'fp32' or 'bf16'
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def cache_dir() -> Path:
    """$MASKDISTILL_CACHE, default ~/.cache/maskdistill: where measured choices are kept."""
    return Path(os.environ.get("MASKDISTILL_CACHE", Path.home() / ".cache" / "maskdistill"))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def faster_precision(seconds: dict[str, float]) -> str:
    """'bf16' when its forward takes at most `BF16_MARGIN` of fp32's, else 'fp32'."""
    return "bf16" if seconds["bf16"] <= BF16_MARGIN * seconds["fp32"] else "fp32"


def measure_precisions(forward: Callable[[], object], device: torch.device | str,
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds of `forward()` in each precision (under `autocast`): one warm-up each, then `TIMED_RUNS`
    alternating runs each, the fastest kept (the least disturbed by other load)."""
    seconds = {name: float("inf") for name in DTYPES}
    with torch.inference_mode():
        for run in range(1 + TIMED_RUNS):
            for name, dtype in DTYPES.items():
                start = clock()
                with autocast(dtype, device):
                    forward()
                if run:  # run 0 is the warm-up (oneDNN builds its kernels on the first call)
                    seconds[name] = min(seconds[name], clock() - start)
    return seconds


def measured_cpu_choice(key: str, forward: Callable[[], object],
                        clock: Callable[[], float] = time.perf_counter) -> PrecisionChoice:
    """The faster precision for `forward` on this CPU, measured once per (CPU model, torch version, `key`) and
    cached in `cache_dir()/precision.json`."""
    cache = cache_dir() / "precision.json"
    full_key = f"{cpu_model()} | torch {torch.__version__} | {key}"
    try:
        entries = json.loads(cache.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    seconds = entries.get(full_key)
    source = f"cached in {cache}"
    if not (isinstance(seconds, dict) and all(isinstance(seconds.get(n), (int, float)) for n in DTYPES)):
        seconds = measure_precisions(forward, "cpu", clock)
        source = "measured"
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, {**entries, full_key: seconds}, indent=1)
        except OSError:  # a read-only home: decide without a cache
            source = "measured (not cached)"
    name = faster_precision(seconds)
    return PrecisionChoice(name, f"auto: {name} is faster on this CPU ({source}: one forward at {key} took "
                                 f"{seconds['fp32']:.3f} s in fp32, {seconds['bf16']:.3f} s in bf16)")


def choose_precision(requested: str, device: torch.device | str, forward: Callable[[], object] | None = None,
                     key: str = "") -> PrecisionChoice:
    """`--precision requested` on `device`, with its reason. On a CPU, `auto` times `forward()` (one forward
    of the job's model at its input shape, described by `key`, e.g. 'dinov2_vits14 1x3x476x476'); without
    one it is fp32."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise UserError(f"unknown --precision {requested!r}; choose one of {list(PRECISIONS)}")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not cuda_bf16:
            raise UserError(f"--precision bf16: {device} does not support bf16; use --precision fp32")
        return PrecisionChoice(requested, f"--precision {requested}")
    if device.type == "cuda":
        return (PrecisionChoice("bf16", "auto: the GPU supports bf16") if cuda_bf16
                else PrecisionChoice("fp32", "auto: the GPU does not support bf16"))
    if device.type == "cpu" and forward is not None:
        return measured_cpu_choice(key, forward)
    return PrecisionChoice("fp32", f"auto: fp32 on {device.type} (nothing measured)")


def precision_was_chosen(reason: str) -> bool:
    """Whether a `PrecisionChoice.reason` is auto's decision (worth a log line), not a precision given."""
    return reason.startswith("auto:")


def resolve_precision(requested: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for `--precision requested` on `device` where no forward can be timed (see
    `choose_precision`): torch.bfloat16 or torch.float32."""
    return choose_precision(requested, device).dtype


def precision_name(dtype: torch.dtype) -> str:
    """`fp32` or `bf16`: the name recorded in run settings (a resume must not mix precisions)."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def autocast(dtype: torch.dtype, device: torch.device | str) -> ContextManager:
    """Autocast to `dtype` on `device`'s type, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
