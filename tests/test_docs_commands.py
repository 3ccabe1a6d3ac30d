"""Every command in README.md and docs/*.md is checked as written.

Commands are the lines of ```sh / ```bash / ```console blocks and, in unlabelled blocks, the lines that start
like a command (`python `, `torchrun `, `sh `, `bash `, `maskdistill-`, `.venv/bin/python`); backslash
continuations are joined, comments dropped, `for VAR in ...; do ... done` loops expanded over their values,
`$(...)` taken as one word, and an optional part written `[--flag value]` is checked both with and without it.

- `python SCRIPT ARGS` (also `.venv/bin/python`, `torchrun ... SCRIPT`, `maskdistill-*`): the script exists and
  its parser accepts ARGS (a dry parse in one interpreter, tests/helpers/script_probe.py); a `--config` /
  `--config_exp` / `--config_env` file must exist and load, with the `--set` overrides, against the script's
  own schema. Placeholder paths (IMAGES, /data/VOCdevkit) are fine: a parse does not open files.
- `python -m pytest FILES`: the test files exist.
- `sh detectron2_train/*.sh ARGS` recipes: the script exists and reads every environment variable it is
  documented with. They are run for real by tests/test_maskrcnn_recipes.py, tests/test_ggn_recipe.py and
  tests/test_maskrcnn_train.py.
- The README quick start and the README's gen_masks command are run for real by tests/test_pipeline.py and
  tests/test_gen_masks_cli.py from constants that must still be README commands, word for word.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"sh", "bash", "console", "shell"}
COMMAND_STARTS = ("python ", "torchrun ", "sh ", "bash ", "maskdistill-", ".venv/bin/python")
PYTHONS = {"python", ".venv/bin/python"}
CONFIG_FLAGS = ("--config", "--config_exp", "--config_env", "--round_config")
# Commands of other projects, quoted for comparison: not checked here.
EXTERNAL = {"maskcut.py": "CutLER's script, run in a CutLER checkout (docs/benchmarks.md)"}
# Commands shown to be refused, with the error they are documented to give (docs/configs.md).
REFUSED = {"--set solver.max_iterr=5": "unknown config key 'solver.max_iterr' (did you mean 'solver.max_iter'?)",
           "--set solver.batch_size=0": "--set solver.batch_size=0: solver.batch_size must be >= 1, got 0"}


@dataclass
class DocCommand:
    where: str  # file:line
    text: str   # as written (continuations joined, loop variables and optional parts resolved)
    env: dict[str, str] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _block_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command line) of every command line of the file's code blocks, continuations joined."""
    found, language, pending, start = [], None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            language = None if language is not None else stripped[3:].strip()
            continue
        if language is None or language not in SHELL_BLOCKS | {""}:
            continue
        if not pending:
            if not stripped or stripped.startswith("#"):
                continue
            is_loop = bool(re.match(r"for \w+ in .*; do$", stripped)) or stripped == "done"
            if language == "" and not (stripped.startswith(COMMAND_STARTS) or is_loop):
                continue
            start = number
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            found.append((start, pending))
            pending = ""
    return found


def _optional_variants(text: str) -> list[str]:
    """`a [--b c] d` -> ["a --b c d", "a d"] (every combination when there are several optional parts)."""
    parts = re.split(r"\[([^\[\]]*)\]", text)
    fixed, optional = parts[0::2], parts[1::2]
    variants = []
    for keep in itertools.product((True, False), repeat=len(optional)):
        pieces = [fixed[0]]
        for opt, kept, rest in zip(optional, keep, fixed[1:]):
            pieces += [opt if kept else "", rest]
        variants.append(" ".join("".join(pieces).split()))
    return variants


def doc_commands(paths: list[Path]) -> list[DocCommand]:
    commands = []
    for path in paths:
        label = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
        loops: list[tuple[str, list[str]]] = []
        for number, line in _block_lines(path):
            loop = re.match(r"for (\w+) in (.*); do$", line)
            if loop:
                loops.append((loop[1], loop[2].split()))
                continue
            if line == "done":
                loops.pop()
                continue
            names = [name for name, _ in loops]
            for values in itertools.product(*(vals for _, vals in loops)):
                text = line
                for name, value in zip(names, values):
                    text = re.sub(rf"\$\{{?{name}\b}}?", value, text)
                text = re.sub(r"\$\([^()]*\)", "SUBSTITUTED", text)  # one word stands for the substitution
                text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
                for variant in _optional_variants(text):
                    words = shlex.split(variant, comments=True)
                    env = {}
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                        key, value = words.pop(0).split("=", 1)
                        env[key] = value
                    if words:
                        commands.append(DocCommand(f"{label}:{number}", variant, env, words))
    return commands


COMMANDS = doc_commands([REPO / path for path in DOC_FILES])
CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def script_and_args(cmd: DocCommand) -> tuple[str, list[str]] | None:
    """The Python script a command runs and its arguments; None for other commands."""
    words = cmd.words
    if words[0] in PYTHONS and words[1] != "-m":
        return words[1], words[2:]
    if words[0] == "torchrun":
        at = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[at], words[at + 1:]
    if words[0].startswith("maskdistill-"):
        module = CONSOLE_SCRIPTS[words[0]].split(":")[0]
        return module.replace(".", "/") + ".py", words[1:]
    return None


def configs_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, word in enumerate(args[:-1]) if word in CONFIG_FLAGS]


PYTHON_COMMANDS = [c for c in COMMANDS if script_and_args(c) and script_and_args(c)[0] not in EXTERNAL]
SH_COMMANDS = [c for c in COMMANDS if c.words[0] in {"sh", "bash"}]
PYTEST_COMMANDS = [c for c in COMMANDS if c.words[:3] in (["python", "-m", "pytest"], [".venv/bin/python", "-m", "pytest"])]


def test_every_command_is_recognised():
    known = {id(c) for c in [*PYTHON_COMMANDS, *SH_COMMANDS, *PYTEST_COMMANDS]}
    external = [c for c in COMMANDS if script_and_args(c) and script_and_args(c)[0] in EXTERNAL]
    unknown = [str(c) for c in COMMANDS if id(c) not in known and c not in external]
    assert not unknown


def test_extraction_on_a_hand_made_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("""Inline `python not_a_command.py` is prose.

```
tree/
python a.py --x 1 \\
    --y "two words"   # a comment
output line
```

```sh
# a comment line
NPROC=2 sh detectron2_train/train_voc.sh ROOT OUT
for s in A B; do
  python b.py --in $s.json --classes $(cut -f1 $s.txt) [--opt]
done
```

```python
python c.py
```
""")
    found = [(c.where, c.text, c.env, c.words) for c in doc_commands([page])]
    b_words = ["python", "b.py", "--in", "{}.json", "--classes", "SUBSTITUTED"]
    assert found == [
        ("page.md:5", 'python a.py --x 1 --y "two words"', {}, ["python", "a.py", "--x", "1", "--y", "two words"]),
        ("page.md:12", "NPROC=2 sh detectron2_train/train_voc.sh ROOT OUT", {"NPROC": "2"},
         ["sh", "detectron2_train/train_voc.sh", "ROOT", "OUT"]),
        *[("page.md:14", f"python b.py --in {s}.json --classes SUBSTITUTED{opt}", {},
           [w.format(s) for w in b_words] + opt.split()) for s in "AB" for opt in (" --opt", "")],
    ]


@pytest.fixture(scope="module")
def parse_report() -> dict[str, dict]:
    payload, missing = [], {}
    for cmd in PYTHON_COMMANDS:
        script, args = script_and_args(cmd)
        absent = [p for p in [script, *configs_of(args)] if not (REPO / p).is_file()]
        if absent:
            missing[str(cmd)] = {"ok": False, "error": f"no such file: {', '.join(absent)}"}
            continue
        payload.append({"script": script, "argv": args, "configs": configs_of(args)})
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.script_probe", "parse", json.dumps(payload)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    checked = [c for c in PYTHON_COMMANDS if str(c) not in missing]
    return {**missing, **{str(c): r for c, r in zip(checked, results)}}


@pytest.mark.parametrize("cmd", PYTHON_COMMANDS, ids=str)
def test_python_command_is_accepted(parse_report, cmd):
    result = parse_report[str(cmd)]
    refusal = next((error for flag, error in REFUSED.items() if flag in cmd.text), None)
    if refusal is not None:
        assert not result["ok"] and refusal in result["error"], result
    else:
        assert result["ok"], f"{cmd}\n  {result['error']}"


def recipe_code(script: Path) -> str:
    """A shell recipe's lines, comments left out, with the files it sources (`. "$(dirname "$0")/x.sh"`)."""
    lines = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
    code = "\n".join(lines)
    for sourced in re.findall(r'^\s*\.\s+"\$\(dirname "\$0"\)/([\w.]+)"', code, re.M):
        code += "\n" + recipe_code(script.parent / sourced)
    return code


@pytest.mark.parametrize("cmd", SH_COMMANDS, ids=str)
def test_recipe_exists_and_reads_its_documented_variables(cmd):
    script = REPO / cmd.words[1]
    assert script.is_file(), cmd
    text = recipe_code(script)
    unread = [name for name in cmd.env if not re.search(rf"\$\{{?{name}\b", text)]
    assert not unread, f"{cmd}: {script.name} never reads {unread}"


@pytest.mark.parametrize("cmd", PYTEST_COMMANDS, ids=str)
def test_pytest_command_names_existing_tests(cmd):
    words, files = cmd.words[3:], []
    for previous, word in zip(["", *words], words):
        if not word.startswith("-") and previous not in ("-m", "-k"):  # -m/-k take an expression
            files.append(word)
    assert all(list(REPO.glob(f)) for f in files), cmd  # no files: the whole suite


def test_commands_run_for_real_are_still_the_readme_commands():
    from tests.test_gen_masks_cli import README_GEN_MASKS
    from tests.test_pipeline import README_QUICK_START

    readme = {c.text for c in COMMANDS if c.where.startswith("README.md:")}
    assert {README_QUICK_START, README_GEN_MASKS} <= readme
