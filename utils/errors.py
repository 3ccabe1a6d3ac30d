"""One clear error line instead of a traceback for problems the user can fix."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, TextIO


class UserError(Exception):
    """A problem with the user's input (path, file, argument). Printed as one line, exit 2."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def print_safely(message: str, stream: TextIO) -> None:
    """Print a line even if it holds characters the stream cannot encode (a file name that is not
    UTF-8 is read as lone surrogates): those are written as backslash escapes instead of raising."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    print(message.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=stream)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning `UserError` into `error: ...` and exit code 2."""
    try:
        code = main()
    except UserError as exc:
        print_safely(f"error: {exc}", sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
