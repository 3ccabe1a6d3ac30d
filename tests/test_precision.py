"""`--precision auto|fp32|bf16`: CUDA by its bf16 support, a CPU by a timed forward (faked clock), cached."""
import json

import pytest
import torch

import utils.precision as precision
from utils.errors import UserError
from utils.precision import autocast, choose_precision, measure_precisions, precision_name, resolve_precision


@pytest.fixture
def gpu_with(monkeypatch):
    def set_gpu(available, bf16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    return set_gpu


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision.json"


class FakeForward:
    """A forward whose 'duration' on a fake clock depends on the autocast dtype in force."""

    def __init__(self, fp32: float, bf16: float):
        self.cost = {torch.float32: fp32, torch.bfloat16: bf16}
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        self.calls.append(dtype)
        self.now += self.cost[dtype] + (10.0 if len(self.calls) <= 2 else 0.0)  # the warm-ups are slow


def choose_with(forward: FakeForward, monkeypatch, key="arch 1x3x8x8"):
    monkeypatch.setattr(precision, "measure_precisions",
                        lambda f, device, clock=None: measure_precisions(f, device, forward.clock))
    return choose_precision("auto", "cpu", forward, key)


@pytest.mark.parametrize("fp32,bf16,expected", [
    (1.0, 0.5, "bf16"),  # bf16 clearly faster
    (1.0, 0.95, "bf16"),  # at the margin
    (1.0, 0.97, "fp32"),  # a near-tie goes to the exact precision
    (1.0, 1.3, "fp32"),  # bf16 slower (avx512_bf16 without AMX)
])
def test_auto_on_cpu_takes_the_faster_measured_precision(cache, monkeypatch, fp32, bf16, expected):
    forward = FakeForward(fp32, bf16)
    choice = choose_with(forward, monkeypatch)
    assert choice.name == expected and choice.dtype == precision.DTYPES[expected]
    # one warm-up each, then TIMED_RUNS alternating runs each, under the right autocast
    assert forward.calls == [torch.float32, torch.bfloat16] * (1 + precision.TIMED_RUNS)
    assert f"{fp32:.3f} s in fp32, {bf16:.3f} s in bf16" in choice.reason and "measured" in choice.reason


def test_the_warm_up_is_not_timed_and_the_fastest_run_counts():
    times = iter([0, 50,  # the warm-ups' starts (their ends are not read)
                  100, 103, 103, 105,  # fp32 3 s, bf16 2 s
                  200, 202, 202, 206])  # fp32 2 s, bf16 4 s
    seconds = measure_precisions(lambda: None, "cpu", clock=lambda: next(times))
    assert seconds == {"fp32": 2, "bf16": 2}


def test_the_choice_is_cached_per_cpu_torch_and_key(cache, monkeypatch):
    first = choose_with(FakeForward(1.0, 0.5), monkeypatch)
    assert first.name == "bf16"
    entries = json.loads(cache.read_text())
    (key, seconds), = entries.items()
    assert precision.cpu_model() in key and torch.__version__ in key and key.endswith("arch 1x3x8x8")
    assert seconds == {"fp32": 1.0, "bf16": 0.5}
    again = FakeForward(1.0, 2.0)  # would now choose fp32, but the cached measurement is used
    second = choose_with(again, monkeypatch)
    assert second.name == "bf16" and not again.calls and "cached in" in second.reason
    other = FakeForward(1.0, 2.0)  # another key (shape) is measured on its own
    assert choose_with(other, monkeypatch, key="arch 1x3x16x16").name == "fp32" and other.calls
    assert len(json.loads(cache.read_text())) == 2


def test_a_corrupt_cache_is_measured_again(cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    forward = FakeForward(1.0, 2.0)
    assert choose_with(forward, monkeypatch).name == "fp32" and forward.calls
    assert len(json.loads(cache.read_text())) == 1


def test_auto_on_cpu_without_a_forward_is_fp32(cache):
    choice = choose_precision("auto", "cpu")
    assert choice.name == "fp32" and "nothing measured" in choice.reason
    assert resolve_precision("auto", "cpu") == torch.float32 and not cache.exists()


@pytest.mark.parametrize("available,bf16,expected", [(True, True, "bf16"), (True, False, "fp32")])
def test_auto_on_cuda_follows_bf16_support_without_measuring(cache, gpu_with, available, bf16, expected):
    gpu_with(available, bf16)
    forward = FakeForward(1.0, 5.0 if expected == "bf16" else 0.1)  # the opposite of what a measurement would say
    choice = choose_precision("auto", "cuda:0", forward, "k")
    assert choice.name == expected and not forward.calls and "GPU" in choice.reason
    assert resolve_precision("auto", "cuda:0") == precision.DTYPES[expected]


def test_auto_elsewhere_is_fp32():
    assert resolve_precision("auto", "mps") == torch.float32


def test_explicit_requests(gpu_with):
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16  # allowed, even where slower
    assert choose_precision("bf16", "cpu").reason == "--precision bf16"
    gpu_with(True, False)
    assert resolve_precision("fp32", "cuda") == torch.float32
    with pytest.raises(UserError, match="--precision bf16: cuda does not support bf16"):
        resolve_precision("bf16", "cuda")
    with pytest.raises(UserError, match="unknown --precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_cpu_model_of_this_machine_is_read():
    assert precision.cpu_model().strip()


def test_names_and_autocast():
    assert precision_name(torch.bfloat16) == "bf16" and precision_name(torch.float32) == "fp32"
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 3)
    with autocast(torch.bfloat16, "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.float32, "cpu"):
        assert layer(x).dtype == torch.float32
