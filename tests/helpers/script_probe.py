"""Run repository scripts as `python SCRIPT ARGS` would, many in one interpreter (torch is imported at most
once): `python -m tests.helpers.script_probe MODE JSON` from the repository root prints one JSON line.

- `help`: JSON is a list of scripts; per script its `--help` text, exit code and whether torch was imported by
  then (tests/test_entry_points.py).
- `parse`: JSON is a list of {"script", "argv", "configs"}; per command whether its argument parser accepts
  `argv` (a dry parse: the script is stopped by the first successful top-level parse, before any work) and,
  when `configs` names config files, whether they and the command's `--set` overrides load against the
  script's own schema (it is stopped once they have; tests/test_docs_commands.py).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys


class _Accepted(Exception):
    """The command's arguments (and configs) were accepted: stop the script before it does any work."""


class _Refused(Exception):
    """argparse refused the arguments (its `error` would have printed usage and exited 2)."""


def _run(script: str, argv: list[str]) -> tuple[object, str, str]:
    """Run `script` as __main__ with `argv`; returns (outcome, stdout, stderr). The outcome is an exit code,
    or the exception that stopped the script."""
    sys.argv = [script, *argv]
    out, err = io.StringIO(), io.StringIO()
    outcome: object = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            outcome = exc.code
        except Exception as exc:  # noqa: BLE001 - reported to the test, which names the command
            outcome = exc
    return outcome, out.getvalue(), err.getvalue()


def help_report(scripts: list[str]) -> dict:
    report = {}
    for script in scripts:
        code, out, _ = _run(script, ["--help"])
        code = code if code is None or isinstance(code, (int, str)) else repr(code)
        report[script] = {"torch": "torch" in sys.modules, "exit": code, "help": out}
    return report


class _DryParse:
    """Patches argparse and utils.config so that a script stops as soon as its command line is accepted."""

    def __init__(self) -> None:
        import utils.config as config  # patched before any script imports its names

        self.parse_depth = 0
        self.config_depth = 0
        self.configs_left: set[str] = set()
        parser_cls = argparse.ArgumentParser
        parse_args, parse_known_args = parser_cls.parse_args, parser_cls.parse_known_args
        load_config, run_config_from_args = config.load_config, config.run_config_from_args
        probe = self

        def parsing(original):
            def patched(self, *args, **kwargs):
                probe.parse_depth += 1
                try:
                    result = original(self, *args, **kwargs)
                finally:
                    probe.parse_depth -= 1
                if probe.parse_depth == 0 and not probe.configs_left:
                    raise _Accepted
                return result
            return patched

        def error(self, message):
            raise _Refused(f"{self.prog}: error: {message}")

        def loading(original, path_of):
            def patched(*args, **kwargs):
                probe.config_depth += 1
                try:
                    result = original(*args, **kwargs)
                finally:
                    probe.config_depth -= 1
                probe.configs_left.discard(os.path.normpath(str(path_of(*args, **kwargs))))
                if probe.config_depth == 0 and not probe.configs_left:
                    raise _Accepted
                return result
            return patched

        parser_cls.parse_args = parsing(parse_args)
        parser_cls.parse_known_args = parsing(parse_known_args)
        parser_cls.error = error
        config.load_config = loading(load_config, lambda path, *a, **k: path)
        config.run_config_from_args = loading(run_config_from_args, lambda args, *a, **k: args.config)

    def check(self, script: str, argv: list[str], configs: list[str]) -> dict:
        self.configs_left = {os.path.normpath(path) for path in configs}
        self.parse_depth = self.config_depth = 0
        outcome, out, err = _run(script, argv)
        if isinstance(outcome, _Accepted) or (outcome == 0 and {"-h", "--help"} & set(argv)):
            return {"ok": True, "error": ""}
        if isinstance(outcome, _Refused):
            error = str(outcome)
        elif isinstance(outcome, BaseException):
            error = f"{type(outcome).__name__}: {outcome}"
        elif self.configs_left:
            error = f"exit {outcome} before loading {sorted(self.configs_left)}: {err.strip()[-500:]}"
        else:
            error = f"exit {outcome} without parsing its arguments: {err.strip()[-500:]}"
        return {"ok": False, "error": error}


def parse_report(commands: list[dict]) -> list[dict]:
    probe = _DryParse()
    return [probe.check(c["script"], c["argv"], c["configs"]) for c in commands]


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    report = help_report(payload) if mode == "help" else parse_report(payload)
    sys.stdout.write(json.dumps(report) + "\n")
