"""`python utils/cluster.py ...`: the clustering stage's documented command (see orchestrate/cluster.py,
which holds its parser and `main`, and docs/evaluation.md).

This file is an entry-point script, not a library module: nothing imports it. It is the one file under
utils/ that imports from above utils/ (the orchestration package).
"""
from __future__ import annotations

from orchestrate.cluster import build_parser, cli, main  # noqa: F401  (main/build_parser: for `utils.cluster`)

if __name__ == "__main__":
    cli()
