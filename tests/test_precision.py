"""`--precision auto|fp32|bf16`: the hardware decision, with the CPU and GPU capabilities mocked."""
import pytest
import torch

import utils.precision as precision
from utils.errors import UserError
from utils.precision import autocast, precision_name, resolve_precision


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    return set_flags


@pytest.fixture
def gpu_with(monkeypatch):
    def set_gpu(available, bf16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return set_gpu


@pytest.mark.parametrize("flags,expected", [
    (("avx512f", "avx512_bf16"), torch.bfloat16),  # Cooper Lake, Zen 4
    (("amx_tile", "amx_bf16"), torch.bfloat16),  # Sapphire Rapids AMX
    (("avx2", "fma3"), torch.float32),  # no bf16 instructions: bf16 is emulated, slower
    (("avx512f", "avx512_bw", "amx_int8"), torch.float32),  # AVX-512 and int8 AMX alone are not bf16
    ((), torch.float32),
])
def test_auto_on_cpu_follows_the_bf16_instructions(cpu_with, flags, expected):
    cpu_with(*flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize("available,bf16,expected", [(True, True, torch.bfloat16), (True, False, torch.float32)])
def test_auto_on_cuda_follows_bf16_support(cpu_with, gpu_with, available, bf16, expected):
    cpu_with("avx512_bf16")  # the host CPU must not matter for a GPU
    gpu_with(available, bf16)
    assert resolve_precision("auto", "cuda:0") == expected


def test_auto_elsewhere_is_fp32(cpu_with):
    cpu_with("amx_bf16")
    assert resolve_precision("auto", "mps") == torch.float32


def test_explicit_requests(cpu_with, gpu_with):
    cpu_with()
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16  # allowed (emulated), just slow
    gpu_with(True, False)
    assert resolve_precision("fp32", "cuda") == torch.float32
    with pytest.raises(UserError, match="--precision bf16: cuda does not support bf16"):
        resolve_precision("bf16", "cuda")
    with pytest.raises(UserError, match="unknown --precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_cpu_flags_of_this_machine_are_read():
    flags = precision.cpu_flags()
    assert flags and all(isinstance(f, str) for f in flags)


def test_names_and_autocast():
    assert precision_name(torch.bfloat16) == "bf16" and precision_name(torch.float32) == "fp32"
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 3)
    with autocast(torch.bfloat16, "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.float32, "cpu"):
        assert layer(x).dtype == torch.float32
