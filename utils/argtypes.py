"""Checked command-line values: numeric ranges and device names, validated while the flags are parsed.

    parser = OneLineArgumentParser(...)
    parser.add_argument("--heads", type=int_range(1), default=5)
    parser.add_argument("--tau", type=float_range(0, 1, high_open=True), default=0.2)

A bad value stops the command with one line, `error: argument --heads: must be >= 1, not 0`, and
exit code 2 (through `utils.errors.run_cli`), before any work or file is created. NaN and infinite
values are refused by every float range.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable

from utils.errors import UserError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one `error: ...` line and exit 2 (a `UserError`), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(message)


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return "must be " + " and ".join(parts)


def _checked(kind: type, low: float | None, high: float | None, low_open: bool,
             high_open: bool) -> Callable[[str], int | float]:
    rule = _describe(low, high, low_open, high_open)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{rule}, not {text}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{rule}, not {text}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{rule}, not {text}")
        return value

    parse.__name__ = f"{kind.__name__}_range"  # argparse names the type in some messages
    return parse


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """argparse `type=`: an integer in [low, high] (either bound may be left out)."""
    return _checked(int, low, high, False, False)  # type: ignore[return-value]


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """argparse `type=`: a finite float between low and high (bounds inclusive unless `*_open`)."""
    return _checked(float, low, high, low_open, high_open)  # type: ignore[return-value]


def device_name(text: str) -> str:
    """argparse `type=`: `auto`, `cpu`, `cuda` or `cuda:N`."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, not {text!r}")
    return text
