"""Inference precision: `--precision auto|fp32|bf16`, decided once, in one place, for every stage.

`auto` takes bf16 where the hardware runs it natively and fp32 elsewhere:

* CUDA: bf16 when the GPU supports it (`torch.cuda.is_bf16_supported()`, Ampere and newer).
* CPU: bf16 when it has AVX512-BF16 or AMX-BF16 instructions (oneDNN then runs bf16 matrix
  products natively; without them bf16 is emulated and slower than fp32).
* any other device: fp32.

bf16 means autocast: weights stay fp32, matrix products and convolutions run in bf16.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from utils.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# CPU features (names of torch.cpu.get_capabilities() and of /proc/cpuinfo flags) that run bf16 natively.
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags: `torch.cpu.get_capabilities()` when torch has it, else /proc/cpuinfo."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return {name for name, value in get_capabilities().items() if value is True}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matrix products natively."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(requested: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for `--precision requested` on `device`: torch.bfloat16 or torch.float32."""
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise UserError(f"unknown --precision {requested!r}; choose one of {list(PRECISIONS)}")
    if requested == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise UserError(f"--precision bf16: {device} does not support bf16; use --precision fp32")
    return DTYPES[requested]


def precision_name(dtype: torch.dtype) -> str:
    """`fp32` or `bf16`: the name recorded in run settings (a resume must not mix precisions)."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def autocast(dtype: torch.dtype, device: torch.device | str) -> ContextManager:
    """Autocast to `dtype` on `device`'s type, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
