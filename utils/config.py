"""YAML configs with `_base_` inheritance and `--set a.b=value` command-line overrides."""
from __future__ import annotations

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
