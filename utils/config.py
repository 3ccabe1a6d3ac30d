"""YAML configs checked against a schema: `_base_` inheritance and `--set a.b=value` command-line overrides.

A trainer declares its settings once, in Python: a `DEFAULTS` dict (every key, its default value) and a
`ConfigSchema` built from it. The schema takes each key's type from its default; keys whose default is
None declare their types in a small table, and allowed values sit in another (ranges from utils/cli.py,
the ones command-line flags use, or tuples of choices):

    DEFAULTS = {"data": {"train_json": None, "num_workers": 2}, "solver": {"base_lr": 0.02, "steps": [60, 80]}}
    SCHEMA = ConfigSchema(DEFAULTS, types={"data.train_json": str},
                          ranges={"data.num_workers": int_range(0), "model.norm": ("bn", "gn"),
                                  "solver.base_lr": float_range(0, min_inclusive=False)})

YAML files in configs/ then state only what differs from the defaults. Every layer (each YAML file of a
`_base_` chain, each `--set`, each command-line flag) is checked on its own, so an error names the file or
the flag that set the value: unknown keys, wrong types, out-of-range values, `_base_` cycles, missing base
files and empty files are each one `UserError` line.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
import types as pytypes
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from utils.cli import device
from utils.coco_io import write_text
from utils.errors import UserError

BASE_KEY = "_base_"  # a file name, or a list of file names merged in order, relative to the YAML's folder

TypeSpec = Union[type, pytypes.GenericAlias]  # bool, int, float, str, list, or list[int] etc.


# ----------------------------------------------------------------------------- types


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _describe(spec: TypeSpec) -> str:
    if isinstance(spec, pytypes.GenericAlias):
        return f"a list of {_PLURALS[spec.__args__[0]]}"
    return _TYPE_NAMES[spec]


def _coerce(value: Any, spec: TypeSpec) -> tuple[bool, Any]:
    """(fits, value): ints and numeric strings ('1e-4', which YAML reads as a string) count as numbers."""
    if isinstance(spec, pytypes.GenericAlias):  # list[X]
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, spec.__args__[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if spec is bool:
        return isinstance(value, bool), value
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if spec is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, value
    if spec is list:
        return isinstance(value, list), value
    return isinstance(value, spec), value


def _spec_of(value: Any, dotted: str) -> TypeSpec:
    """The type a default value implies: bool, int, float, str, list[element type] (or list when empty)."""
    if isinstance(value, list):
        kinds = {type(v) for v in value}
        if not kinds:
            return list
        if kinds <= {int, float} and float in kinds:
            return list[float]
        if len(kinds) == 1 and next(iter(kinds)) in _PLURALS:
            return list[next(iter(kinds))]
        return list
    if type(value) in _TYPE_NAMES:
        return type(value)
    raise ValueError(f"config default {dotted} = {value!r}: only bool, int, float, str, lists and sections are supported")


# ----------------------------------------------------------------------------- the schema


class ConfigSchema:
    """Every key a config may set, its types and its allowed values, derived from a defaults dict.

    `types` maps dotted keys to a type (bool, int, float, str, list, list[int], ...) or a tuple of them:
    required for keys whose default is None (which then also accept null), optional elsewhere.
    `ranges` maps dotted keys to a numeric range (`utils.cli.int_range` / `float_range`, the same ranges the
    command-line flags use), a tuple of choices, or another set of allowed values (`utils.cli.DEVICE_NAMES`:
    anything with `in` and a `str` that says what it allows); list values are checked per element.
    With `strict=False` (for callers that pass a bare defaults dict), None-default keys take any value.
    """

    def __init__(self, defaults: dict, types: dict[str, TypeSpec | tuple] | None = None,
                 ranges: dict[str, Any] | None = None, strict: bool = True) -> None:
        self.defaults = defaults
        self.ranges = dict(ranges or {})
        self.sections: set[str] = set()
        self.specs: dict[str, tuple] = {}  # dotted key -> allowed type specs; () = anything
        self.nullable: set[str] = set()
        declared = {k: v if isinstance(v, tuple) else (v,) for k, v in (types or {}).items()}
        self._walk(defaults, "", declared, strict)
        for name, table in (("types", declared), ("ranges", self.ranges)):
            for dotted in table:
                if dotted not in self.specs:
                    raise ValueError(f"schema {name} names {dotted!r}, which is not a key of the defaults")
        self.check(defaults, "the built-in defaults")  # a broken defaults table is a programming error

    def _walk(self, node: dict, prefix: str, declared: dict, strict: bool) -> None:
        self.sections.add(prefix.rstrip("."))
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                self._walk(value, dotted + ".", declared, strict)
            elif dotted in declared:
                self.specs[dotted] = declared[dotted]
            elif value is None:
                if strict:
                    raise ValueError(f"config default {dotted} is None: declare its type in the schema's types")
                self.specs[dotted] = ()
            else:
                self.specs[dotted] = (_spec_of(value, dotted),)
            if value is None:
                self.nullable.add(dotted)

    def extend(self, defaults: dict, types: dict[str, TypeSpec | tuple] | None = None,
               ranges: dict[str, Any] | None = None) -> ConfigSchema:
        """A schema for a variant whose defaults add keys (or change values) over this one's."""
        inherited = {k: v for k, v in self.specs.items() if k in _leaf_keys(defaults)}
        return ConfigSchema(defaults, {**inherited, **(types or {})}, {**self.ranges, **(ranges or {})})

    @property
    def keys(self) -> list[str]:
        return sorted(self.specs)

    # -------------------------------------------------------------- checking
    def check(self, layer: dict, source: str, prefix: str = "") -> dict:
        """The layer with values normalised (ints as floats where numbers are expected); a `UserError`
        naming `source` and the key for an unknown key, a wrong type or a value out of range."""
        out = {}
        for key, value in layer.items():
            if not isinstance(key, str):
                raise UserError(f"{source}: config keys must be names, got {key!r}")
            dotted = prefix + key
            if dotted in self.sections:
                if not isinstance(value, dict):
                    example = next((k for k in self.keys if k.startswith(dotted + ".")), dotted + ".KEY")
                    raise UserError(f"{source}: {dotted} is a section, not a value; set its keys, e.g. {example}=...")
                out[key] = self.check(value, source, dotted + ".")
            elif dotted in self.specs:
                out[key] = self._check_value(dotted, value, source)
            else:
                raise UserError(f"{source}: unknown config key {dotted!r}{self._hint(dotted)}")
        return out

    def _check_value(self, dotted: str, value: Any, source: str) -> Any:
        specs = self.specs[dotted]
        if value is None and dotted in self.nullable:
            return None
        if specs:
            for spec in specs:
                fits, coerced = _coerce(value, spec)
                if fits:
                    value = coerced
                    break
            else:
                wanted = " or ".join(_describe(s) for s in specs) + (" (or null)" if dotted in self.nullable else "")
                raise UserError(f"{source}: {dotted} must be {wanted}, got {_show(value)}")
        allowed = self.ranges.get(dotted)
        if allowed is not None:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(allowed, tuple):  # choices
                    fits, wanted = item in allowed, "one of " + ", ".join(str(c) for c in allowed)
                else:  # a numeric range, or other allowed values that say what they are (utils.cli.DEVICE_NAMES)
                    fits, wanted = item in allowed, str(allowed)
                if not fits:
                    raise UserError(f"{source}: {dotted} must be {wanted}"
                                    f"{' (every element)' if isinstance(value, list) else ''}, got {_show(value)}")
        return value

    def _hint(self, dotted: str) -> str:
        candidates = [k for k in self.keys + sorted(self.sections) if k and not dotted.startswith(k + ".")]
        close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
        section = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        if section in self.sections:
            names = sorted({k[len(section) + 1 if section else 0:].split(".")[0] for k in self.keys
                            if not section or k.startswith(section + ".")})
            return f"; {'the keys of ' + repr(section) if section else 'the top-level keys'} are: {', '.join(names)}"
        return ""


def _leaf_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        keys |= _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return keys


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_schema(defaults: dict | ConfigSchema | None) -> ConfigSchema | None:
    """The schema itself; a bare defaults dict as a lenient schema; None (no checking) for None."""
    if defaults is None or isinstance(defaults, ConfigSchema):
        return defaults
    return ConfigSchema(defaults, strict=False)


# ----------------------------------------------------------------------------- files


def merge_configs(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base`, section by section (lists and values are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """One YAML file as a mapping (its `_base_` key untouched); one-line errors for missing, invalid or empty files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"config {path} is not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {exc}") from None
    if data is None or data == {}:
        raise UserError(f"config {path} is empty; a run on the built-in defaults alone is never meant "
                        f"(name a real config, or one holding at least {BASE_KEY}: other.yaml)")
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of keys at the top level, not {type(data).__name__}")
    return data


def base_files(path: str | os.PathLike, data: dict) -> list[Path]:
    """The files named by a config's `_base_` (one name or a list), resolved against its folder."""
    bases = data.get(BASE_KEY)
    if bases is None:
        return []
    names = bases if isinstance(bases, list) else [bases]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{path}: {BASE_KEY} must be a file name or a list of file names, got {bases!r}")
    resolved = []
    for name in names:
        base = Path(path).parent / name
        if not base.is_file():
            raise UserError(f"{path}: {BASE_KEY} file {name} not found (looked for {base})")
        resolved.append(base)
    return resolved


def load_yaml(path: str | os.PathLike, schema: ConfigSchema | None = None,
              _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML config merged over its `_base_` files (in order, each resolved the same way); with a
    schema, every file of the chain is checked against it and named in the error."""
    path = Path(path)
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(here):], here))
        raise UserError(f"{BASE_KEY} cycle: {cycle}")
    data = read_yaml_mapping(path)
    merged: dict = {}
    for base in base_files(path, data):
        merged = merge_configs(merged, load_yaml(base, schema, (*_chain, here)))
    own = {k: v for k, v in data.items() if k != BASE_KEY}
    if schema is not None:
        own = schema.check(own, str(path))
    return merge_configs(merged, own)


def redundant_keys(path: str | os.PathLike, schema: ConfigSchema) -> list[str]:
    """The dotted keys a YAML file sets to the value it inherits anyway (from the defaults and its `_base_`
    files): configs state only what differs, so these should go. Unknown keys and bad values raise."""
    data = read_yaml_mapping(path)
    inherited = schema.defaults
    for base in base_files(path, data):
        inherited = merge_configs(inherited, load_yaml(base, schema))
    own = schema.check({k: v for k, v in data.items() if k != BASE_KEY}, str(path))
    return sorted(k for k in _leaf_keys(own) if get(own, k) == get(inherited, k, object()))


# ----------------------------------------------------------------------------- overrides


def parse_override(item: str, source: str | None = None) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML: numbers, lists, booleans, null; else the raw text).
    `source` names the flag and value in messages (default: `--set 'item'`)."""
    dotted, sep, raw = item.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted or any(not part or part != part.strip() for part in dotted.split(".")):
        raise UserError(f"{source or f'--set {item!r}'}: an override must look like key.sub=value, e.g. "
                        "solver.max_iter=1000")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return dotted, value


def nested(dotted: str, value: Any) -> dict:
    """{"a": {"b": value}} for "a.b"."""
    node: Any = value
    for key in reversed(dotted.split(".")):
        node = {key: node}
    return node


def apply_overrides(config: dict, overrides: Iterable[str] | None, schema: ConfigSchema | None = None,
                    flag: str = "--set") -> dict:
    """Apply `key.sub=value` overrides in order; each is checked against the schema on its own (messages
    name `flag`)."""
    schema = as_schema(schema)
    for item in overrides or []:
        dotted, value = parse_override(item, f"{flag} {item!r}")
        layer = nested(dotted, value)
        if schema is not None:
            layer = schema.check(layer, f"{flag} {item}")
        config = merge_configs(config, layer)
    return config


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                defaults: dict | ConfigSchema | None = None) -> dict:
    """Defaults, then the YAML file (with its `_base_` chain), then command-line overrides, each checked
    against the schema (a bare defaults dict checks key names and the types of non-None defaults)."""
    schema = as_schema(defaults)
    config = merge_configs(schema.defaults if schema is not None else {}, load_yaml(path, schema))
    return apply_overrides(config, overrides, schema)


def save_config(config: dict, path: str | os.PathLike) -> None:
    """Save the resolved config next to an output, atomically."""
    write_text(path, yaml.safe_dump(config, sort_keys=False))


def get(config: dict, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


# ----------------------------------------------------------------------------- command line


def config_epilog(must_set: dict[str, str], example: str) -> str:
    """--help text: the config keys a user must set (dotted key -> what it is) and an example command."""
    lines = ["config keys to set (in the YAML or with --set KEY=VALUE):"]
    lines += [f"  {key:<24} {text}" for key, text in must_set.items()] or ["  none: the config holds them all"]
    lines += ["", "example:", f"  {example}"]
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser, config_help: str, set_example: str,
                    output_dir_help: str | None = None, device_help: str | None = None,
                    must_set: dict[str, str] | None = None, example: str | None = None) -> None:
    """Add `--config` and `--set KEY=VALUE ...`, plus `--output_dir` / `--device` when given a help text.

    `run_config_from_args` reads them back. `--set` may be repeated; all the overrides apply, in order.
    `--output_dir` and `--device` added here set the config keys of the same name. With `must_set` and
    `example`, `--help` ends with the keys a user must set and an example command.
    """
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override config keys (values are parsed as YAML), e.g. --set {set_example}")
    config_flags = []
    if output_dir_help is not None:
        parser.add_argument("--output_dir", default=None, help=output_dir_help)
        config_flags.append("output_dir")
    if device_help is not None:
        parser.add_argument("--device", type=device, default=None, help=device_help)
        config_flags.append("device")
    if example is not None:
        parser.epilog = config_epilog(must_set or {}, example)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # Remember which flags stand for config keys, so that a script's own --device stays its own.
    parser.set_defaults(_config_flags=tuple(config_flags))


def apply_flags(config: dict, flags: dict[str, Any], schema: ConfigSchema | None = None) -> dict:
    """Set dotted keys from command-line flags (a None value means the flag was not given), each checked."""
    for dotted, value in flags.items():
        if value is None:
            continue
        layer = nested(dotted, value)
        if schema is not None:
            layer = schema.check(layer, f"the flag for {dotted}")
        config = merge_configs(config, layer)
    return config


def run_config(path: str | os.PathLike, overrides: Iterable[str] | None, defaults: dict | ConfigSchema | None,
               flags: dict[str, Any] | None = None) -> dict:
    """A run's config: defaults < the YAML file (with its `_base_` chain) < `overrides` (`KEY=VALUE`, as --set) <
    `flags` (dotted key -> value, None when not given). All are checked. What a script's flags and a caller's
    typed settings both come down to."""
    schema = as_schema(defaults)
    return apply_flags(load_config(path, list(overrides or []), schema), flags or {}, schema)


def run_config_from_args(args: argparse.Namespace, defaults: dict | ConfigSchema | None = None,
                    flags: dict[str, Any] | None = None) -> dict:
    """`run_config` of the flags of `add_config_args`: defaults < the `--config` YAML < `--set` overrides <
    `--output_dir` / `--device` < a script's own `flags` (dotted key -> value, None when not given)."""
    own = {key: getattr(args, key) for key in getattr(args, "_config_flags", ())}
    return run_config(args.config, args.overrides, defaults, {**own, **(flags or {})})
