"""YAML configs with `_base_` inheritance and `--set a.b=value` command-line overrides."""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import yaml

from utils.coco_io import write_text
from utils.errors import UserError


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping at the top level")
    base = data.pop("_base_", None)
    if base is not None:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def apply_overrides(config: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` overrides; values are parsed as YAML (numbers, lists, bools)."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise UserError(f"override {item!r}: unknown config section {key!r}")
            node = node[key]
        if keys[-1] not in node:
            raise UserError(f"override {item!r}: unknown config key {dotted!r}")
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[keys[-1]] = raw
    return config


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                defaults: dict | None = None) -> dict:
    """Defaults, then the YAML file (with its `_base_` chain), then command-line overrides."""
    config = _merge(defaults or {}, load_yaml(path))
    return apply_overrides(config, overrides)


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


def add_config_args(parser: argparse.ArgumentParser, config_help: str, set_example: str,
                    output_dir_help: str | None = None, device_help: str | None = None) -> None:
    """Add `--config` and `--set KEY=VALUE ...`, plus `--output_dir` / `--device` when given a help text.

    `load_run_config` reads them back. `--set` may be repeated; all the overrides apply, in order.
    `--output_dir` and `--device` added here set the config keys of the same name.
    """
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override config keys (values are parsed as YAML), e.g. --set {set_example}")
    config_flags = []
    if output_dir_help is not None:
        parser.add_argument("--output_dir", default=None, help=output_dir_help)
        config_flags.append("output_dir")
    if device_help is not None:
        parser.add_argument("--device", default=None, help=device_help)
        config_flags.append("device")
    # Remember which flags stand for config keys, so that a script's own --device stays its own.
    parser.set_defaults(_config_flags=tuple(config_flags))


def load_run_config(args: argparse.Namespace, defaults: dict | None = None) -> dict:
    """Defaults < the `--config` YAML (with its `_base_` chain) < `--set` overrides < `--output_dir` / `--device`."""
    config = load_config(args.config, args.overrides, defaults)
    for key in getattr(args, "_config_flags", ()):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config
