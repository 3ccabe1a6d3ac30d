"""utils/cluster.py and utils/crop_features.py: matching on known permutations, crops, whitening, caching
and the end-to-end job."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from utils import cluster, crop_features
from utils.errors import UserError
from utils.metrics import cluster_scores, hungarian_match, majority_match

torch.set_num_threads(1)


def test_hungarian_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    perm = np.array([3, 0, 4, 1, 2])  # class c -> cluster perm[c]
    target = rng.integers(0, 5, size=500)
    pred = perm[target].copy()
    noisy = rng.random(500) < 0.1
    pred[noisy] = rng.integers(0, 5, size=noisy.sum())
    mapping = hungarian_match(pred, target, 5, 5)
    assert mapping == {int(perm[c]): c for c in range(5)}  # cluster -> class is the inverse permutation
    scores = cluster_scores(pred, target, 5, 5)
    assert scores["matching"] == "hungarian"
    expected_acc = np.mean(np.array([mapping[p] for p in pred]) == target)
    assert scores["ACC"] == pytest.approx(expected_acc) and 0.88 < scores["ACC"] < 1.0


def test_majority_matching_when_overclustering():
    # 6 clusters for 3 classes: class c is split over clusters 2c and 2c + 1, in a shuffled order.
    shuffle = np.array([4, 1, 5, 0, 3, 2])
    target = np.repeat([0, 1, 2], 40)
    pred = shuffle[2 * target + np.tile([0, 1], 60)]
    mapping = majority_match(pred, target, 6, 3)
    assert mapping == {int(shuffle[k]): k // 2 for k in range(6)}
    scores = cluster_scores(pred, target, 6, 3)
    assert scores["matching"] == "majority" and scores["ACC"] == 1.0
    # Hungarian would have to leave 3 clusters unmatched: majority is what over-clustering needs.
    assert len(hungarian_match(pred, target, 6, 3)) == 3


def test_kmeans_on_separated_blobs_and_whitening():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 10
    labels = np.repeat(np.arange(4), 30)
    feats = centres[labels] + rng.normal(size=(120, 16))
    feats[:, 3] *= 50  # a dimension on another scale: whitening removes its dominance
    white = cluster.whiten_normalise(feats)
    assert np.allclose(np.linalg.norm(white, axis=1), 1.0, atol=1e-5)
    from scipy.cluster.vq import whiten

    ref = whiten(feats)
    assert np.allclose(white, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assign, inertia = cluster.run_kmeans(white, white, 4, seed=0, backend="sklearn")
    assert inertia > 0
    assert cluster_scores(assign, labels, 4, 4)["ACC"] == 1.0
    with pytest.raises(UserError, match="only 3 masks"):
        cluster.run_kmeans(white[:3], white[:3], 4, seed=0, backend="sklearn")
    if not cluster.faiss_available():
        with pytest.raises(UserError, match="faiss is not installed"):
            cluster.run_kmeans(white, white, 4, seed=0, backend="faiss")


def test_crop_boxes():
    img = {"width": 100, "height": 50}
    assert crop_features.crop_box({"bbox": [10.4, 5.6, 20.2, 10.0]}, img) == (10, 6, 31, 16)
    assert crop_features.crop_box({"bbox": [-5, -5, 20, 20]}, img) == (0, 0, 15, 15)  # clipped to the image
    assert "empty box" in crop_features.crop_box({"bbox": [10, 10, 0, 5]}, img)
    assert "outside" in crop_features.crop_box({"bbox": [120, 10, 10, 5]}, img)
    assert "non-finite" in crop_features.crop_box({"bbox": [float("nan"), 10, 10, 5]}, img)


def _masks_from_gt(tiny_coco, tmp_path, num_images=4, per_image=3):
    """A gen_masks-style JSON (one 'object' class) made from GT boxes of a few val2017 images."""
    gt = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
    images = gt["images"][:num_images]
    anns = []
    for img in images:
        own = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        own = sorted(own, key=lambda a: -a["area"])[:per_image]  # big objects: few, quick crops
        for a in own:
            x, y, w, h = a["bbox"]
            scale = min(1.0, 96 / max(w, h))  # keep crops small so the random ViT stays fast on CPU
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": 1, "segmentation": a["segmentation"],
                         "bbox": [x, y, max(1.0, w * scale), max(1.0, h * scale)], "score": 1.0, "iscrowd": 0,
                         "area": a["area"]})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    path = tmp_path / "masks.json"
    path.write_text(json.dumps(data))
    return path, data


def _args(*argv):
    return cluster.build_parser().parse_args(list(argv))


def test_cluster_job_labels_caches_and_skips_bad_masks(tiny_coco, tmp_path, monkeypatch):
    path, data = _masks_from_gt(tiny_coco, tmp_path)
    # Two bad masks: an empty box and a box outside its image; reported and skipped.
    data["annotations"].append(dict(data["annotations"][0], id=100, bbox=[10, 10, 0, 0]))
    data["annotations"].append(dict(data["annotations"][0], id=101, bbox=[5000, 10, 30, 30]))
    path.write_text(json.dumps(data))
    gt_file = tiny_coco / "annotations" / "instances_val2017.json"
    out, metrics_json = tmp_path / "out" / "labelled.json", tmp_path / "metrics.json"
    common = ["--input_file", str(path), "--image_root", str(tiny_coco / "val2017"), "--output_file", str(out),
              "--gt_file", str(gt_file), "--weights", "random", "--patch_size", "16", "--num_workers", "0",
              "--device", "cpu", "--batch_size", "4", "--metrics_json", str(metrics_json), "--overwrite"]
    metrics = cluster.cluster_masks(_args(*common, "--num_classes", "3", "--trials", "2"))
    labelled = json.loads(out.read_text())
    n = len(data["annotations"]) - 2
    assert len(labelled["annotations"]) == metrics["num_labelled_masks"] == n
    assert metrics["num_skipped"] == 2
    assert {s["index"] for s in metrics["skipped"]["target"]} == {n, n + 1}
    gt_cats = {c["id"] for c in json.loads(gt_file.read_text())["categories"]}
    assert {c["id"] for c in labelled["categories"]} == gt_cats
    assert {a["category_id"] for a in labelled["annotations"]} <= gt_cats
    assert labelled["images"] == data["images"]
    saved = json.loads(metrics_json.read_text())
    assert saved["matching"] == "majority" and len(saved["trials"]) == 2  # 3 clusters, 80 GT classes
    for key in ("ACC", "NMI", "ARI"):
        assert 0 <= saved[key] <= 100
    caches = sorted(p.name for p in out.parent.glob("labelled.target.*.npy"))
    assert len(caches) == 1
    feats = np.load(out.parent / caches[0])
    assert feats.shape == (n + 2, 384) and np.isnan(feats[n:]).all() and np.isfinite(feats[:n]).all()

    # A second run with other clustering settings reuses the cache: the network is never built.
    import distill.vit

    def no_network(*a, **k):
        raise AssertionError("the ViT should not run when features are cached")

    monkeypatch.setattr(distill.vit, "build_vit", no_network)
    again = cluster.cluster_masks(_args(*common, "--num_classes", "2", "--overcluster", "2"))
    assert again["num_clusters"] == 4 and again["num_skipped"] == 2
    # Without GT the clusters 1..K are the categories.
    no_gt = [a for a in common if a not in ("--gt_file", str(gt_file))]
    plain = cluster.cluster_masks(_args(*no_gt, "--num_classes", "3"))
    labelled = json.loads(out.read_text())
    assert [c["id"] for c in labelled["categories"]] == [1, 2, 3]
    assert sum(plain["cluster_sizes"]) == n and "ACC" not in plain

    # A changed input invalidates the cache (new key), so the network would run.
    data["annotations"] = data["annotations"][:-3]
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="should not run"):
        cluster.cluster_masks(_args(*no_gt, "--num_classes", "3"))


def test_support_set_and_input_errors(tiny_coco, tmp_path, repo_root):
    path, data = _masks_from_gt(tiny_coco, tmp_path, num_images=3, per_image=2)
    support = tmp_path / "support.json"
    gt = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
    sup_images = gt["images"][10:12]
    sup_anns = [dict(a, score=1.0, bbox=[a["bbox"][0], a["bbox"][1], min(a["bbox"][2], 48), min(a["bbox"][3], 48)])
                for a in gt["annotations"] if a["image_id"] in {i["id"] for i in sup_images} and not a["iscrowd"]][:4]
    support.write_text(json.dumps({"images": sup_images, "annotations": sup_anns, "categories": gt["categories"]}))
    out = tmp_path / "labelled.json"
    base = [sys.executable, "utils/cluster.py", "--input_file", str(path), "--image_root", str(tiny_coco / "val2017"),
            "--output_file", str(out), "--weights", "random", "--patch_size", "16", "--num_workers", "0",
            "--device", "cpu", "--num_classes", "2", "--metrics_json", str(tmp_path / "m.json")]
    cluster.cluster_masks(_args(*base[2:], "--support_file", str(support), "--support_root", str(tiny_coco / "val2017")))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_support_masks"] == len(sup_anns)
    labelled = json.loads(out.read_text())
    assert len(labelled["annotations"]) == len(data["annotations"])  # only the target set is labelled
    assert {a["image_id"] for a in labelled["annotations"]} <= {i["id"] for i in data["images"]}

    # Mismatched image ids between predictions and the dataset: one clear line, exit 2, no output.
    data["annotations"][1]["image_id"] = 424242
    path.write_text(json.dumps(data))
    out.unlink()
    proc = subprocess.run(base, cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2 and "annotation #1" in proc.stderr and "424242" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and not out.exists()
    with pytest.raises(UserError, match="one root per support file"):
        cluster.cluster_masks(_args("--input_file", str(path), "--image_root", str(tiny_coco), "--output_file",
                                    str(out), "--support_file", str(support)))


def _downscaled_val2017(tiny_coco, tmp_path, num_images: int, side: int = 128):
    """The first val2017 images and their GT, scaled to `side` px on the longer side (in tmp_path only), so
    that a random ViT on 2 shared CPU cores handles full-image crops in seconds."""
    from PIL import Image

    gt = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
    images = sorted(gt["images"], key=lambda i: i["file_name"])[:num_images]
    ids = {i["id"] for i in images}
    root = tmp_path / "val2017_small"
    root.mkdir()
    scale_of = {}
    for img in images:
        scale = side / max(img["width"], img["height"])
        with Image.open(tiny_coco / "val2017" / img["file_name"]) as im:
            im = im.convert("RGB").resize((round(img["width"] * scale), round(img["height"] * scale)), Image.BILINEAR)
            im.save(root / img["file_name"], quality=95)
            img["width"], img["height"] = im.size
        scale_of[img["id"]] = scale
    anns = []
    for a in gt["annotations"]:
        if a["image_id"] in ids and not a["iscrowd"]:
            s = scale_of[a["image_id"]]
            anns.append(dict(a, bbox=[v * s for v in a["bbox"]], area=a["area"] * s * s,
                             segmentation=[[v * s for v in poly] for poly in a["segmentation"]]))
    gt_path = tmp_path / "instances_val2017_small.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": gt["categories"]}))
    return root, gt_path


def test_cluster_end_to_end_on_gen_masks_output(tiny_coco, tmp_path, repo_root, monkeypatch, capsys):
    """gen_masks.py (random ViT) on tiny_coco val2017 images, then cluster.py with their GT. Both entry
    points run in this process (each subprocess would pay ~9 s of torch import on the shared CI cores);
    the CLI wrapper itself is exercised by test_support_set_and_input_errors."""
    if not (repo_root / "gen_masks.py").is_file():
        pytest.skip("gen_masks.py is not in the repository yet")
    import gen_masks

    image_root, gt_path = _downscaled_val2017(tiny_coco, tmp_path, num_images=6)
    masks = tmp_path / "masks.json"
    monkeypatch.setattr(sys, "argv", ["gen_masks.py", "--dataset", "folder", "--dataset_root", str(image_root),
                                      "--weights", "random", "--pred_json_path", str(masks), "--arch", "vit_small",
                                      "--patch_size", "16", "--resize", "112", "--num_workers", "0", "--device", "cpu"])
    assert gen_masks.main() == 0
    num_masks = len(json.loads(masks.read_text())["annotations"])
    assert num_masks >= 2
    out, metrics_json = tmp_path / "labelled.json", tmp_path / "metrics.json"
    monkeypatch.setattr(sys, "argv", ["utils/cluster.py", "--input_file", str(masks), "--image_root", str(image_root),
                                      "--gt_file", str(gt_path), "--output_file", str(out), "--metrics_json",
                                      str(metrics_json), "--weights", "random", "--patch_size", "16", "--num_classes",
                                      "2", "--num_workers", "0", "--device", "cpu"])
    capsys.readouterr()
    cluster.main()
    assert "ACC" in capsys.readouterr().out.strip().splitlines()[-1]
    labelled = json.loads(out.read_text())
    metrics = json.loads(metrics_json.read_text())
    assert len(labelled["annotations"]) + metrics["num_skipped"] == num_masks
    assert labelled["images"] == json.loads(masks.read_text())["images"]
    cat_ids = {c["id"] for c in labelled["categories"]}
    assert len(cat_ids) == 80 and all(a["category_id"] in cat_ids for a in labelled["annotations"])
    for key in ("ACC", "NMI", "ARI"):
        assert 0 <= metrics[key] <= 100


def test_interrupted_extraction_resumes_from_partial(tiny_coco, tmp_path):
    from distill.vit import build_vit

    path, data = _masks_from_gt(tiny_coco, tmp_path, num_images=2, per_image=1)
    mask_set = crop_features.load_mask_set("target", path, tiny_coco / "val2017")
    torch.manual_seed(0)
    model = build_vit("vit_small", 16, "random")
    partial = tmp_path / "f.partial.npz"
    first = crop_features.extract_features(mask_set, model, torch.device("cpu"), 16, batch_size=1, partial_path=partial,
                                     save_every_s=0.0, progress=False)
    with np.load(partial) as saved:  # saved after the first image, before the last one finished
        assert saved["done"].sum() >= 1

    class Broken(torch.nn.Module):
        vit = model.vit

        def cls_features(self, x):
            raise AssertionError("finished crops must not be recomputed")

    np.savez(partial, features=first, done=np.ones(len(first), dtype=bool))
    resumed = crop_features.extract_features(mask_set, Broken(), torch.device("cpu"), 16, partial_path=partial, progress=False)
    assert np.array_equal(resumed, first)


def test_unreadable_image_in_a_worker_is_one_line_and_keeps_finished_crops(tiny_coco, tmp_path):
    """A corrupt image read in a DataLoader worker gives one clear error line (not the worker's traceback),
    and the crops finished before it are saved for the next run."""
    import shutil

    from distill.vit import build_vit

    path, data = _masks_from_gt(tiny_coco, tmp_path, num_images=2, per_image=1)
    root = tmp_path / "images"
    root.mkdir()
    for img in data["images"]:
        shutil.copy(tiny_coco / "val2017" / img["file_name"], root / img["file_name"])
    (root / data["images"][1]["file_name"]).write_bytes(b"not a jpeg")
    mask_set = crop_features.load_mask_set("target", path, root)
    torch.manual_seed(0)
    model = build_vit("vit_small", 16, "random")
    partial = tmp_path / "f.partial.npz"
    with pytest.raises(UserError) as info:
        crop_features.extract_features(mask_set, model, torch.device("cpu"), 16, batch_size=8, num_workers=1,
                                       partial_path=partial, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot read image") and data["images"][1]["file_name"] in message
    with np.load(partial) as saved:
        assert saved["done"].tolist() == [True, False]


def test_faiss_backend_glue_with_a_stand_in_module(monkeypatch):
    """faiss is optional and absent here: a stand-in with faiss' Kmeans API (train, index.search, obj) checks
    how run_kmeans drives it and reads its results."""
    import types

    from sklearn.cluster import KMeans

    calls = {}

    class Index:
        def __init__(self, centroids):
            self.centroids = centroids

        def search(self, x, k):
            dist = ((x[:, None, :] - self.centroids[None]) ** 2).sum(-1)
            order = np.argsort(dist, axis=1)[:, :k]
            return np.take_along_axis(dist, order, axis=1), order

    class Kmeans:
        def __init__(self, d, k, **kwargs):
            calls.update(d=d, k=k, **kwargs)

        def train(self, x):
            assert x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
            km = KMeans(calls["k"], n_init=3, random_state=calls["seed"]).fit(x)
            self.index, self.obj = Index(km.cluster_centers_.astype(np.float32)), [km.inertia_ * 2, km.inertia_]

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(Kmeans=Kmeans))
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 20)
    feats = cluster.whiten_normalise(rng.normal(size=(3, 8))[labels] * 10 + rng.normal(size=(60, 8)))
    assign, inertia = cluster.run_kmeans(feats, feats[::2], 3, seed=5, backend="auto")
    assert calls["d"] == 8 and calls["k"] == 3 and calls["seed"] == 5
    assert assign.dtype == np.int64 and assign.shape == (30,)
    assert cluster_scores(assign, labels[::2], 3, 3)["ACC"] == 1.0 and inertia > 0
