"""Fingerprints of the settings that make a result, so that resumed work refuses state made with others.

    recorded = fingerprint("deeplab", config, ignore=HARMLESS_KEYS)   # stored with the state
    ...
    check_fingerprint(state.get("fingerprint"), fingerprint("deeplab", config, HARMLESS_KEYS), "checkpoint X")

A fingerprint is a plain dict: the kind of job, the settings flattened to dotted keys
(`solver.base_lr`) minus the harmless ones, and for every setting that names an existing file (model
weights, image lists, COCO JSON) its SHA-256 instead of its path: a file rewritten with other content
no longer matches, a copy elsewhere still does. Folders and other values count as they are written.
`ignore` takes dotted keys and shell-style patterns (`test.*`, `data.val_*`).
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from utils.errors import UserError


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"solver": {"base_lr": 0.1}} -> {"solver.base_lr": 0.1}; values normalised as JSON would store them."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = json.loads(json.dumps(value, default=str))  # tuples -> lists, paths -> str
    return flat


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (remembered per path, size and mtime within the process)."""
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _is_file(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and "\n" not in value and Path(value).is_file()


def fingerprint(kind: str, settings: Mapping[str, Any], ignore: Iterable[str] = (),
                files: Mapping[str, str | os.PathLike | None] | None = None) -> dict:
    """The fingerprint of `settings` (see the module docstring).

    `files` adds inputs outside the settings (e.g. initial weights given by a flag); a resume may leave
    one out (it is then not compared), but not give another one.
    """
    patterns = tuple(ignore)
    flat = {k: v for k, v in flatten(settings).items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    extra = {k: os.fspath(v) for k, v in (files or {}).items() if v is not None}
    flat.update(extra)
    values, digests = {}, {}
    for key, value in sorted(flat.items()):
        if _is_file(value):
            digests[key] = {"path": value, "sha256": file_digest(value)}
        else:
            values[key] = value
    return {"kind": kind, "settings": values, "files": digests, "extra_inputs": sorted(extra)}


def _describe(print_: dict, key: str) -> tuple[Any, str]:
    """(what is compared, how it reads) for one key of a fingerprint."""
    if key in print_.get("files", {}):
        entry = print_["files"][key]
        return ("file", entry["sha256"]), f"{entry['path']} (sha256 {entry['sha256'][:12]})"
    value = print_.get("settings", {}).get(key)
    return ("value", value), repr(value) if not isinstance(value, str) else value


def difference(recorded: dict | None, current: dict, first: Sequence[str] = ()) -> str | None:
    """How `recorded` differs from `current`, in words (the first differing key), or None when they agree.

    Keys are compared in the order of `first` (e.g. the flags' order: a method before its options), then sorted."""
    if not isinstance(recorded, dict) or "kind" not in recorded:
        return "it records no settings to compare (another tool or an older version made it)"
    if recorded["kind"] != current["kind"]:
        return f"it was made by {recorded['kind']}, not {current['kind']}"
    given_now = set(current["settings"]) | set(current["files"])
    every = set(recorded.get("settings", {})) | set(recorded.get("files", {})) | given_now
    keys = [k for k in dict.fromkeys(first) if k in every] + sorted(every.difference(first))
    for key in keys:
        if key in recorded.get("extra_inputs", ()) and key not in given_now:
            continue  # an input outside the settings, not given again on resume
        (old, old_text), (new, new_text) = _describe(recorded, key), _describe(current, key)
        if old != new:
            return f"it was made with {key}={old_text}, not {new_text}"
    return None


def check_fingerprint(recorded: dict | None, current: dict, source: str, remedy: str | None = None) -> None:
    """UserError `cannot resume from SOURCE: it was made with KEY=OLD, not NEW; REMEDY` when they differ.

    The default remedy: the same settings or --overwrite; for another kind of job's state, another folder.
    """
    reason = difference(recorded, current)
    if reason is None:
        return
    if remedy is None:
        same_kind = isinstance(recorded, dict) and recorded.get("kind") == current["kind"]
        remedy = ("use the same settings, or --overwrite to start again" if same_kind else
                  "use another output folder, or --overwrite to delete that state and start again")
    raise UserError(f"cannot resume from {source}: {reason}; {remedy}")
