"""Named choices whose implementation is imported only when used: the one registry mechanism of the commands.

A registration is a name, the "module:attribute" of what it stands for, and a phrase for --help. Listing the
names (`--method` choices, a config schema's allowed values) and the phrases imports nothing, so every `--help`
stays torch-free; `load(name)` imports the module when a run needs it.
"""
from __future__ import annotations

import importlib

from utils.errors import UserError


class Registry:
    def __init__(self, what: str):
        self.what = what  # what a name selects, for messages ("--method", "model.backbone")
        self.entries: dict[str, tuple[str, str]] = {}  # name -> ("module:attribute", summary), in --help order

    def register(self, name: str, target: str, summary: str = "") -> None:
        """Make `name` a choice: `target` ("module:attribute") is what it stands for, imported on first use."""
        if name in self.entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self.entries[name] = (target, summary)

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    # A registry is also its set of names, so that a config schema's allowed values (utils.config) can be the
    # registry itself and follow every registration: `name in registry`, and `str` says what is allowed.
    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries)

    def __str__(self) -> str:
        return "one of " + ", ".join(self.entries)

    def summaries(self) -> str:
        """`name: summary; ...` for --help."""
        return "; ".join(f"{name}: {summary}" for name, (_, summary) in self.entries.items())

    def target(self, name: str) -> str:
        return self.entries[name][0]

    def load(self, name: str) -> object:
        """What `name` stands for (its module imported now); a clear error for an unknown name."""
        if name not in self.entries:
            raise UserError(f"unknown {self.what} {name!r}; choose one of {list(self.entries)}")
        module, attribute = self.target(name).split(":")
        return getattr(importlib.import_module(module), attribute)
