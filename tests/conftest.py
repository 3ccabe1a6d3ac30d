"""Shared fixtures: the real images in ../shared/data (skipped cleanly when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not present: {path}")
    return path


@pytest.fixture
def tiny_coco() -> Path:
    return _require(SHARED_DATA / "tiny_coco")


@pytest.fixture
def voc_mini() -> Path:
    """The VOCdevkit folder of voc_mini (contains VOC2012/)."""
    return _require(SHARED_DATA / "voc_mini" / "VOCdevkit")


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def one_thread():
    """One torch thread for the test (training tests are faster so on the shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
