"""One clear error line instead of a traceback for problems the user can fix."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input (path, file, argument). Printed as one line, exit 2."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point, turning `UserError` into `error: ...` and exit code 2."""
    try:
        code = main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
