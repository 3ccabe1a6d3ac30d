"""Run a command-line entry point in the test process (no subprocess): exit code, stdout, stderr."""
from __future__ import annotations

import contextlib
import io
import shlex
from typing import Callable

from utils.errors import run_cli


def run_main(main: Callable[[list[str]], object], argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` as `python script.py ARGV` would run it (argparse errors and `UserError` included)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: main(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def interrupt_on_call(real: Callable, call: int) -> Callable:
    """`real`, except that its `call`-th call raises KeyboardInterrupt (a kill at that point of a run)."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return wrapped


def error_line(stderr: str) -> str:
    """The one `error: ...` line of a refused run (argparse's `prog: error: ...` counts too)."""
    lines = [ln for ln in stderr.strip().splitlines() if "error: " in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def documented_argv(command: str, placeholders: dict[str, str]) -> list[str]:
    """The arguments of a documented `python SCRIPT ARGS` command (one line, as in the docs) for a test to run:
    `../shared/data` points at the real data folder and each placeholder word is replaced."""
    from tests.conftest import SHARED_DATA

    words = shlex.split(command)[2:]
    return [placeholders.get(w, w.replace("../shared/data", str(SHARED_DATA), 1)) for w in words]
