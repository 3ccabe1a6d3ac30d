"""A memory-mapped cache of a frozen backbone's features: one `.npy` per input, keyed by the input's bytes.

    cache = FeatureCache(directory, identity={"arch": ..., "weights_sha256": ...})
    features = cache.fetch(image, compute)   # image: the exact tensor the backbone reads

An entry's key is the SHA-256 of the input tensor itself (shape, dtype and every value), so the image
content, its input size and a flip each give their own entry, and an entry can only ever be read back
for the very input it was computed from. What the features are computed *with* (checkpoint, arch,
layer) is the cache's `identity`, stored once in `manifest.json`: a cache made with another identity is
refused, never silently reused. Entries are written atomically (a temporary file renamed into place), so
concurrent processes (torchrun ranks, a resumed run) can share one cache: two that compute the same
entry write the same bytes. Entries are read with `np.load(mmap_mode="r")`. Features are stored in
float16; a miss returns the same rounded values a later hit will, so a run does not depend on which of
its inputs were already cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.coco_io import atomic_path, write_json
from utils.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
STORED_DTYPE = np.float16


def input_key(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and values (on the CPU, contiguous)."""
    array = tensor.detach().to("cpu").contiguous().numpy()
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class FeatureCache:
    """A directory of features: `manifest.json` (format, identity, dtype) and `entries/ab/abcd....npy`."""

    def __init__(self, directory: str | os.PathLike, identity: dict) -> None:
        self.directory = Path(directory)
        self.manifest = {"format": FORMAT, "dtype": np.dtype(STORED_DTYPE).name, "identity": identity}
        self.hits = self.misses = 0
        path = self.directory / MANIFEST
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"feature cache {self.directory} is not a folder")
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"feature cache manifest {path} cannot be read ({exc}); delete the folder") from None
            if recorded != json.loads(json.dumps(self.manifest)):
                raise UserError(f"feature cache {self.directory} was made with other features "
                                f"({_difference(recorded, self.manifest)}); delete it or use another folder")
        elif self.directory.is_dir() and any(self.directory.iterdir()):
            raise UserError(f"feature cache {self.directory} is a folder that is not empty and has no {MANIFEST}; "
                            f"use an empty or new folder")
        else:
            write_json(path, self.manifest, indent=2)  # every process writes the same bytes

    def _entry(self, key: str) -> Path:
        return self.directory / "entries" / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored features of `key`, memory-mapped (read-only), or None."""
        path = self._entry(key)
        if not path.is_file():
            return None
        return np.load(path, mmap_mode="r")

    def put(self, key: str, features: np.ndarray) -> np.ndarray:
        """Store `features` (as float16) atomically; returns what a later `get` gives."""
        stored = np.ascontiguousarray(features, dtype=STORED_DTYPE)
        with atomic_path(self._entry(key)) as tmp, open(tmp, "wb") as f:
            np.save(f, stored)
        return stored

    def fetch(self, tensor: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The features of `tensor`: read from the cache, or `compute(tensor)` stored and returned (the
        float16 values either way, as float32 on `tensor`'s device)."""
        key = input_key(tensor)
        stored = self.get(key)
        if stored is None:
            self.misses += 1
            stored = self.put(key, compute(tensor).detach().float().cpu().numpy())
        else:
            self.hits += 1
        return torch.from_numpy(np.array(stored, dtype=np.float32)).to(tensor.device)


def _difference(recorded: dict, current: dict) -> str:
    rec, cur = recorded.get("identity", {}), current["identity"]
    for key in sorted(set(rec) | set(cur)):
        if rec.get(key) != cur.get(key):
            return f"{key} {rec.get(key)!r}, this run {cur.get(key)!r}"
    return f"format {recorded.get('format')!r} / dtype {recorded.get('dtype')!r}"
