"""The memory-mapped cache of a frozen ViT's tokens: hit, miss, and foreign keys (other image, flip, size,
checkpoint) that are never silently reused."""
import json

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.feature_cache import FeatureCache, input_key
from utils.vit import DinoViT
from utils.vit_features import ViTTokenMaps
from vit_helpers import tiny_vits  # noqa: F401 (fixture)


@pytest.fixture
def checkpoints(tiny_vits, tmp_path):
    """Two different tiny DINOv2 ViT-S/14 checkpoints in the official layout."""
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"ckpt{seed}.pth"
        torch.save(DinoViT("dinov2_vits14").vit.state_dict(), path)
        paths.append(str(path))
    return paths


def test_input_key_sees_content_size_flip_and_dtype():
    image = torch.rand(3, 28, 42)
    assert input_key(image) == input_key(image.clone())
    changed = image.clone()
    changed[0, 5, 5] += 1e-3
    others = [changed, image.flip(-1), image[:, :, :28], image.double(), image.reshape(3, 42, 28)]
    assert len({input_key(image)} | {input_key(o) for o in others}) == 1 + len(others)


def test_hit_and_miss_give_the_same_tokens(checkpoints, tmp_path):
    cache_dir = tmp_path / "cache"
    cached = ViTTokenMaps("dinov2_vits14", weights=checkpoints[0], cache_dir=str(cache_dir))
    plain = ViTTokenMaps("dinov2_vits14", weights=checkpoints[0])
    torch.manual_seed(0)
    canvas = torch.randn(2, 3, 56, 70)
    sizes = [(56, 70), (40, 50)]
    first = cached(canvas, sizes)
    assert (cached.cache.hits, cached.cache.misses) == (0, 2)
    again = cached(canvas, sizes)
    assert (cached.cache.hits, cached.cache.misses) == (2, 2)
    assert torch.equal(first, again)
    exact = plain(canvas, sizes)
    assert torch.equal(first, exact.half().float())  # float16 entries, the same on a miss as on a hit
    entries = list(cache_dir.glob("entries/*/*.npy"))
    assert len(entries) == 2
    assert isinstance(cached.cache.get(entries[0].stem), np.memmap)
    # another process (a resumed run, another rank) reads the same entries
    reopened = ViTTokenMaps("dinov2_vits14", weights=checkpoints[0], cache_dir=str(cache_dir))
    assert torch.equal(reopened(canvas, sizes), first) and reopened.cache.hits == 2


def test_other_image_flip_or_size_is_a_miss_not_a_reuse(checkpoints, tmp_path):
    maps = ViTTokenMaps("dinov2_vits14", weights=checkpoints[0], cache_dir=str(tmp_path / "cache"))
    plain = ViTTokenMaps("dinov2_vits14", weights=checkpoints[0])
    torch.manual_seed(0)
    image = torch.randn(1, 3, 42, 56)
    maps(image)
    for other in (image.flip(-1), torch.randn(1, 3, 42, 56), image[..., :28, :42].contiguous()):
        misses = maps.cache.misses
        assert torch.equal(maps(other), plain(other).half().float())
        assert maps.cache.misses == misses + 1


def test_a_cache_of_another_checkpoint_or_arch_is_refused(checkpoints, tmp_path):
    cache_dir = str(tmp_path / "cache")
    ViTTokenMaps("dinov2_vits14", weights=checkpoints[0], cache_dir=cache_dir)(torch.randn(1, 3, 28, 28))
    with pytest.raises(UserError, match="was made with other features.*weights"):
        ViTTokenMaps("dinov2_vits14", weights=checkpoints[1], cache_dir=cache_dir)
    with pytest.raises(UserError, match="was made with other features.*arch"):
        ViTTokenMaps("dinov2_vits14_reg", weights="random", cache_dir=cache_dir)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["identity"]["weights"].startswith("sha256:")


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "model_final.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="not empty and has no manifest.json"):
        FeatureCache(folder, {"arch": "a"})
    (folder / "model_final.pth").unlink()
    FeatureCache(folder, {"arch": "a"})  # an empty folder becomes a cache
    assert (folder / "manifest.json").is_file()


@pytest.mark.parametrize("trainer", ["detectron2", "segmentation"])
def test_resume_may_move_the_cache_but_not_change_the_vit(trainer):
    """model.vit.cache_dir changes no value (a miss returns what a hit would), so a resume may change it; the
    arch, weights and trainable blocks may not."""
    import copy

    from utils.fingerprint import difference, fingerprint

    if trainer == "detectron2":
        from detectron2_train.engine import DEFAULTS, RESUME_HARMLESS_KEYS
    else:
        from segmentation.engine import DEFAULTS, RESUME_HARMLESS_KEYS

    def print_of(**vit_keys):
        cfg = copy.deepcopy(DEFAULTS)
        cfg["model"]["vit"].update(vit_keys)
        return fingerprint(trainer, cfg, RESUME_HARMLESS_KEYS)

    base = print_of(cache_dir="a")
    assert difference(base, print_of(cache_dir="b")) is None
    assert difference(base, print_of(cache_dir=None)) is None
    for changed in ({"arch": "vit_small"}, {"trainable_blocks": 2}, {"weights": "random"}):
        assert "model.vit." + next(iter(changed)) in difference(base, print_of(cache_dir="a", **changed))


@pytest.mark.slow
def test_torchrun_ranks_share_one_cache_and_a_second_run_only_reads_it(tmp_path):
    """Two gloo ranks train the ViT detector on one cache folder: every input is written once, atomically (no
    temporary file left), and a second two-rank run over the same images adds and rewrites nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.ports import free_port
    from tests.helpers.synthetic_shapes import make_dataset

    repo = Path(__file__).resolve().parents[1]
    data = make_dataset(tmp_path / "syn", num_images=4, seed=3)
    torch.manual_seed(0)
    ckpt = tmp_path / "vits14_random.pth"
    torch.save(DinoViT("dinov2_vits14").vit.state_dict(), ckpt)
    cache = tmp_path / "cache"

    def run(out: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(repo / "detectron2_train" / "train_net.py"), "--config",
               str(repo / "configs" / "detectron2" / "tiny_vit_dinov2_s14_cpu.yaml"), "--device", "cpu",
               "--train_json", str(data), "--train_root", str(data.parent / "images"), "--output_dir", str(out),
               "--set", "solver.max_iter=2", "solver.checkpoint_period=100", "solver.ims_per_batch=4",
               "input.hflip_prob=0.0", "model.backbone=vit", f"model.vit.weights={ckpt}", f"model.vit.cache_dir={cache}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "first")
    entries = {p: p.stat().st_mtime_ns for p in (cache / "entries").rglob("*") if p.is_file()}
    # 2 iterations of 4 images over 2 ranks: every one of the 4 photos (one size, no flip) at least once
    assert len(entries) == 4 and all(p.suffix == ".npy" for p in entries)
    assert json.loads((cache / "manifest.json").read_text())["identity"]["arch"] == "dinov2_vits14"
    run(tmp_path / "second")
    assert {p: p.stat().st_mtime_ns for p in (cache / "entries").rglob("*") if p.is_file()} == entries
    assert [p.name for p in cache.iterdir()] and not [p for p in cache.rglob("*tmp*")]
