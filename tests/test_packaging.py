"""The installable package (pyproject.toml): every entry-point script is a console script, and
`maskdistill-X --help` and `python PATH --help` print the same help without importing torch.

Where env/setup.sh installed this checkout (editable) into the running venv, the real console scripts run
with nothing added to PYTHONPATH, which also shows that `python detectron2_train/train_net.py` resolves its
imports through the install. Elsewhere (no install, or a shared venv installed from another checkout) the
console script is emulated (its entry point called with its name as argv[0]) with this checkout on PYTHONPATH.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]  # console-script name -> "module:function"
# Issue 10: `--help` must not import torch. These still do; remove a name once its --help stops importing torch.
HELP_IMPORTS_TORCH: set[str] = set()  # none since issue 10; a name here is an expected (strict) failure
# Put on PYTHONPATH, this makes `import torch` fail at once: a --help that needs torch exits non-zero in
# well under a second instead of spending ~10 s importing it.
BLOCK_TORCH = "import sys\n\nsys.modules['torch'] = None\n"


class HelpImportsTorch(AssertionError):
    """A `--help` run failed because it imported torch."""


def script_path(target: str) -> str:
    """`gen_masks:cli` -> gen_masks.py, `segmentation.train:cli` -> segmentation/train.py."""
    return target.split(":")[0].replace(".", "/") + ".py"


def installed_here() -> bool:
    """True where this checkout is pip-installed (editable) into the running interpreter's environment."""
    try:
        direct_url = importlib.metadata.distribution("maskdistill").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    url = json.loads(direct_url or "{}").get("url", "")
    return url.startswith("file:") and Path(unquote(urlparse(url).path)).resolve() == REPO


def normalized_help(text: str, prog: str) -> str:
    """The help text with argparse's program name replaced and line wrapping ignored (the usage block wraps
    at a column that depends on the length of the program name)."""
    flat = " ".join(text.split())
    assert flat.startswith(f"usage: {prog} "), text[:200]
    return "usage: PROG " + flat[len(f"usage: {prog} "):]


@pytest.fixture(scope="module")
def torch_blocker(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("block_torch")
    (folder / "sitecustomize.py").write_text(BLOCK_TORCH)
    return folder


def run_help(cmd: list[str], cwd: Path, pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "COLUMNS": "100",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*cmd, "--help"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_entry_point_script_is_a_console_script():
    entry_points = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")
                    if not {".venv", "tests", "benchmarks"} & set(p.relative_to(REPO).parts)
                    and re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert sorted(script_path(t) for t in SCRIPTS.values()) == sorted(entry_points)
    assert all(t.endswith(":cli") and name.startswith("maskdistill-") for name, t in SCRIPTS.items())


def test_the_package_lists_every_module_of_its_scripts():
    setup = PYPROJECT["tool"]["setuptools"]
    modules = {t.split(":")[0] for t in SCRIPTS.values()}
    assert {m for m in modules if "." not in m} == set(setup["py-modules"])
    assert {m.split(".")[0] for m in modules if "." in m} <= set(setup["packages"])
    assert set(setup["packages"]) == {"orchestrate", "evaluation", "distill", "segmentation", "detectron2_train", "utils"}
    assert all((REPO / pkg / "__init__.py").is_file() for pkg in setup["packages"])


def test_no_script_patches_sys_path():
    """The install (or pytest.ini, for the tests) puts the checkout on sys.path; no script edits it."""
    patched = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")
               if not {".venv", "tests"} & set(p.relative_to(REPO).parts)
               and re.search(r"sys\.path(\[|\.insert|\.append)", p.read_text())]
    assert patched == []


def test_the_installed_console_scripts_are_the_declared_ones():
    if not installed_here():
        pytest.skip("this checkout is not pip-installed here (bash env/setup.sh installs it)")
    installed = {ep.name: ep.value for ep in importlib.metadata.distribution("maskdistill").entry_points
                 if ep.group == "console_scripts"}
    assert installed == SCRIPTS


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(
    name in HELP_IMPORTS_TORCH, raises=HelpImportsTorch, strict=True, reason="--help imports torch (issue 10)"))
    for name in SCRIPTS])
def test_console_script_and_python_path_print_the_same_help_without_torch(name, torch_blocker, tmp_path):
    target = SCRIPTS[name]
    path = script_path(target)
    if installed_here():  # the real console script, and imports through the install only
        console = run_help([str(Path(sys.executable).parent / name)], tmp_path, [torch_blocker])
        direct = run_help([sys.executable, path], REPO, [torch_blocker])
    else:
        module, function = target.split(":")
        emulated = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
        console = run_help([sys.executable, "-c", emulated], tmp_path, [torch_blocker, REPO])
        direct = run_help([sys.executable, path], REPO, [torch_blocker, REPO])
    for proc in (console, direct):
        if "import of torch halted" in proc.stderr:
            raise HelpImportsTorch(f"{proc.args} imports torch: {proc.stderr[-2000:]}")
        assert proc.returncode == 0, f"{proc.args}: {proc.stderr[-2000:]}"
    assert normalized_help(console.stdout, name) == normalized_help(direct.stdout, Path(path).name)
