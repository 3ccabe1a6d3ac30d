"""What every command-line parser shares: numeric ranges, devices, worker counts, and output checks.

Bad flag values are refused by argparse itself (`usage: ...` then `prog: error: argument --x: ...`,
exit 2) before anything runs:

    parser.add_argument("--max_images", type=int_range(1), default=None, help="...")
    parser.add_argument("--threshold", type=float_range(0.0, 1.0), default=0.5, help="...")
    parser.add_argument("--iou", type=float_range(0.0, 1.0, min_inclusive=False), ...)
    add_device_arg(parser)            # --device auto|cpu|cuda|cuda:N, checked against the machine
    add_num_workers_arg(parser, 4)    # --num_workers >= 0

Outputs are checked right after parsing, before any input is read or any work is done:

    check_outputs(args.out_json, overwrite=args.overwrite)      # files
    check_outputs(folders=[args.out_dir])                        # folders
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from typing import Any, Iterable, Mapping, TypeVar

from utils.coco_io import check_can_write, check_writable, check_writable_folder

DEVICE_CHOICES = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"


def _bounds_text(minimum: float | None, maximum: float | None, min_inclusive: bool, max_inclusive: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"in {'[' if min_inclusive else '('}{minimum:g}, {maximum:g}{']' if max_inclusive else ')'}"
    if minimum is not None:
        return f"{'>=' if min_inclusive else '>'} {minimum:g}"
    if maximum is not None:
        return f"{'<=' if max_inclusive else '<'} {maximum:g}"
    return "a number"


class _Range:
    """An argparse `type` that parses a number and checks that it lies in a range; `value in r` tests a parsed
    number and `str(r)` says the bounds, so config schemas (utils/config.py) use the same ranges."""

    def __init__(self, kind: type, minimum: float | None, maximum: float | None, min_inclusive: bool,
                 max_inclusive: bool) -> None:
        self.kind, self.minimum, self.maximum = kind, minimum, maximum
        self.min_inclusive, self.max_inclusive = min_inclusive, max_inclusive
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            kind = "an integer" if self.kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value not in self:
            raise argparse.ArgumentTypeError(f"{text} is not {self}")
        return value

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        low_ok = self.minimum is None or (value >= self.minimum if self.min_inclusive else value > self.minimum)
        high_ok = self.maximum is None or (value <= self.maximum if self.max_inclusive else value < self.maximum)
        return low_ok and high_ok

    def __str__(self) -> str:
        return _bounds_text(self.minimum, self.maximum, self.min_inclusive, self.max_inclusive)

    def __repr__(self) -> str:
        return f"{self.kind.__name__} {self}"


def int_range(minimum: int | None = None, maximum: int | None = None) -> _Range:
    """argparse type: an integer in [minimum, maximum] (either bound may be None)."""
    return _Range(int, minimum, maximum, True, True)


def float_range(minimum: float | None = None, maximum: float | None = None, *, min_inclusive: bool = True,
                max_inclusive: bool = True) -> _Range:
    """argparse type: a finite float (NaN and infinities are refused) within the bounds."""
    return _Range(float, minimum, maximum, min_inclusive, max_inclusive)


def device_problem(name: str, check_machine: bool = True) -> str | None:
    """Why `name` cannot be used as a device, or None when it can: it must be `auto`, `cpu`, `cuda` or
    `cuda:N` (case-insensitive); with `check_machine`, a CUDA device must also exist on this machine.
    The one device check: command-line flags (`device`), config values (`DEVICE_NAMES`) and
    `utils.distributed.resolve_device` all use it."""
    text = str(name).strip().lower()
    if text in ("auto", "cpu"):
        return None
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        return f"{name!r} is not a device; use {DEVICE_CHOICES}"
    if not check_machine:
        return None
    import torch  # only when a GPU is asked for

    if not torch.cuda.is_available():
        return f"{name} was asked for but no CUDA GPU is available; use cpu or auto"
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        return f"{name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    return None


def device(text: str) -> str:
    """argparse type: `auto`, `cpu`, `cuda` or `cuda:N`, refused when this machine has no such GPU."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text.strip().lower()


class _DeviceNames:
    """Config schemas' allowed values for a `device` key (utils/config.py): the names `device` takes. Whether
    the machine has the GPU is checked when the device is used (`resolve_device`), not when a config is read:
    a config written for a GPU machine stays readable elsewhere."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and device_problem(value, check_machine=False) is None

    def __str__(self) -> str:
        return DEVICE_CHOICES


DEVICE_NAMES = _DeviceNames()


def add_device_arg(parser: argparse.ArgumentParser, default: str = "auto", help: str | None = None) -> None:
    parser.add_argument("--device", type=device, default=default,
                        help=help or f"where to run: {DEVICE_CHOICES} (default: {default})")


def add_num_workers_arg(parser: argparse.ArgumentParser, default: int | None, help: str | None = None) -> None:
    parser.add_argument("--num_workers", type=int_range(0), default=default,
                        help=help or f"data-loading worker processes, 0 = load in the main process "
                                     f"(default: {default})")


def check_outputs(*files: str | os.PathLike | None, folders: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool | None = None) -> None:
    """Check, before any work, that every output file and folder can be written (not a folder, not under a
    file, not in a read-only place or /proc); with `overwrite` given, also refuse existing files unless it
    is True. `None` entries (optional outputs not asked for) are skipped."""
    for path in files:
        if path is None:
            continue
        check_writable(path)
        if overwrite is not None:
            check_can_write(path, overwrite)
    for folder in folders:
        if folder is not None:
            check_writable_folder(folder)


Options = TypeVar("Options")


def options_from(cls: type[Options], values: Mapping[str, Any]) -> Options:
    """The dataclass `cls` from parsed flag values (flag dest -> value): the fields it has, the rest left out.
    How a command turns its flags into a library's typed settings, once, at the boundary."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
