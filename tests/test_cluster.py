"""The clustering stage (distill/cluster.py, distill/crop_features.py, entry point utils/cluster.py): matching
on known permutations, crops, whitening, exact metrics on hand-made images, the recorded backbone, the
content-keyed cache and the end-to-end job."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from distill import cluster, crop_features
from distill.cluster import ClusterSettings
from tests.cli_helpers import run_main
from utils import cluster as cluster_cli
from utils.coco_io import OBJECT_CATEGORY, box_iou_xywh
from utils.errors import UserError
from evaluation.metrics import cluster_scores, hungarian_match, majority_match

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
    assert scores["ACC"] == np.mean(pred == perm[target])  # exactly the masks the noise left on their cluster


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



def test_kmeans_faiss_backend_without_faiss_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    assert not cluster.faiss_available()
    points = np.eye(4, dtype=np.float32)
    with pytest.raises(UserError, match="--kmeans faiss: faiss is not installed"):
        cluster.run_kmeans(points, points, 2, seed=0, backend="faiss")
    assert cluster.run_kmeans(points, points, 2, seed=0, backend="auto")[0].shape == (4,)  # sklearn then


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


def _args(*argv) -> ClusterSettings:
    return ClusterSettings(**vars(cluster_cli.build_parser().parse_args(list(map(str, argv)))))


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
    # The chosen trial's ACC is the share of labelled masks whose category is the class of their best GT box.
    gt = json.loads(gt_file.read_text())
    correct = []
    for ann in labelled["annotations"]:
        own = [g for g in gt["annotations"] if g["image_id"] == ann["image_id"] and not g["iscrowd"]]
        ious = box_iou_xywh(np.array([ann["bbox"]]), np.array([g["bbox"] for g in own]))[0]
        correct.append(ann["category_id"] == own[int(np.argmax(ious))]["category_id"])
    assert saved["trials"][saved["chosen_trial"]]["ACC"] == pytest.approx(100 * np.mean(correct))
    assert saved["ACC"] == pytest.approx(np.mean([t["ACC"] for t in saved["trials"]]))
    assert saved["backbone"] == {"arch": "vit_small", "patch_size": 16, "weights": "random"}
    caches = sorted(p.name for p in tmp_path.glob("masks.features.*.npy"))  # next to the masks, keyed by content
    assert len(caches) == 1 and saved["feature_caches"] == [str(tmp_path / caches[0])]
    feats = np.load(tmp_path / caches[0])
    assert feats.shape == (n + 2, 384) and np.isnan(feats[n:]).all() and np.isfinite(feats[:n]).all()

    # A second run with other clustering settings reuses the cache: the network is never built.
    import utils.vit

    def no_network(*a, **k):
        raise AssertionError("the ViT should not run when features are cached")

    monkeypatch.setattr(utils.vit, "build_vit", no_network)
    again = cluster.cluster_masks(_args(*common, "--num_classes", "2", "--overcluster", "2"))
    assert again["num_clusters"] == 4 and again["num_skipped"] == 2
    # So does a run with a new --output_file elsewhere: the cache is keyed on content, not on the output.
    elsewhere = [a if a != str(out) else str(tmp_path / "other" / "new_name.json") for a in common]
    assert cluster.cluster_masks(_args(*elsewhere, "--num_classes", "3"))["num_labelled_masks"] == n
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


def test_support_set_and_input_errors(tiny_coco, tmp_path):
    path, data = _masks_from_gt(tiny_coco, tmp_path, num_images=3, per_image=2)
    support = tmp_path / "support.json"
    gt = json.loads((tiny_coco / "annotations" / "instances_val2017.json").read_text())
    sup_images = gt["images"][10:12]
    sup_anns = [dict(a, score=1.0, bbox=[a["bbox"][0], a["bbox"][1], min(a["bbox"][2], 48), min(a["bbox"][3], 48)])
                for a in gt["annotations"] if a["image_id"] in {i["id"] for i in sup_images} and not a["iscrowd"]][:4]
    support.write_text(json.dumps({"images": sup_images, "annotations": sup_anns, "categories": gt["categories"]}))
    out = tmp_path / "labelled.json"
    base = ["--input_file", str(path), "--image_root", str(tiny_coco / "val2017"),
            "--output_file", str(out), "--weights", "random", "--patch_size", "16", "--num_workers", "0",
            "--device", "cpu", "--num_classes", "2", "--metrics_json", str(tmp_path / "m.json")]
    cluster.cluster_masks(_args(*base, "--support_file", str(support), "--support_root", str(tiny_coco / "val2017")))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_support_masks"] == len(sup_anns)
    labelled = json.loads(out.read_text())
    assert len(labelled["annotations"]) == len(data["annotations"])  # only the target set is labelled
    assert {a["image_id"] for a in labelled["annotations"]} <= {i["id"] for i in data["images"]}

    # Mismatched image ids between predictions and the dataset: one clear line, exit 2, no output.
    data["annotations"][1]["image_id"] = 424242
    path.write_text(json.dumps(data))
    out.unlink()
    (tmp_path / "m.json").unlink()  # outputs are kept unless --overwrite: --metrics_json too
    code, _, stderr = run_main(cluster_cli.main, base)  # `python utils/cluster.py ...`, in this process
    assert code == 2 and stderr.strip().splitlines() == [f"error: {path}: annotation #1 has image_id 424242 which is "
                                                         f"not among its images"]
    assert not out.exists()
    code, _, stderr = run_main(cluster_cli.main, [*base, "--num_classes", "0"])
    assert code == 2 and stderr.strip().splitlines()[-1].endswith("argument --num_classes: 0 is not >= 1")
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


def _chosen_trial_acc(labelled: dict, gt: dict) -> float:
    """ACC recomputed from the output: the share of masks labelled with the class of their best GT box."""
    correct = []
    for ann in labelled["annotations"]:
        own = [g for g in gt["annotations"] if g["image_id"] == ann["image_id"] and not g["iscrowd"]]
        if own:
            ious = box_iou_xywh(np.array([ann["bbox"]]), np.array([g["bbox"] for g in own]))[0]
            if ious.max() > 0:
                correct.append(ann["category_id"] == own[int(np.argmax(ious))]["category_id"])
    return 100 * float(np.mean(correct))


def test_cluster_end_to_end_on_gen_masks_output(tiny_coco, tmp_path, monkeypatch, capsys):
    """gen_masks.py (random ViT) on tiny_coco val2017 images, then the README's cluster command with their GT:
    no backbone flags, the masks' recorded ones are used. Both entry points run in this process (each
    subprocess would pay ~9 s of torch import on the shared CI cores)."""
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
    capsys.readouterr()
    cluster_cli.main(["--input_file", str(masks), "--image_root", str(image_root), "--gt_file", str(gt_path),
                      "--output_file", str(out), "--metrics_json", str(metrics_json), "--num_classes", "2",
                      "--num_workers", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "ACC" in captured.out.strip().splitlines()[-1] and "warning" not in captured.err
    labelled = json.loads(out.read_text())
    metrics = json.loads(metrics_json.read_text())
    assert len(labelled["annotations"]) + metrics["num_skipped"] == num_masks
    assert labelled["images"] == json.loads(masks.read_text())["images"]
    cat_ids = {c["id"] for c in labelled["categories"]}
    assert len(cat_ids) == 80 and all(a["category_id"] in cat_ids for a in labelled["annotations"])
    assert metrics["backbone"] == {"arch": "vit_small", "patch_size": 16, "weights": "random"}  # from masks.json
    assert metrics["ACC"] == pytest.approx(_chosen_trial_acc(labelled, json.loads(gt_path.read_text())))


def _colour_squares(root, count: int = 4):
    """Grey images, each with a solid red (class 1) and a solid green (class 2) 24 px square: GT and masks."""
    from PIL import Image

    root.mkdir()
    colours = {1: (230, 30, 30), 2: (30, 200, 40)}
    images, gt_anns = [], []
    for i in range(count):
        canvas = np.full((64, 96, 3), 128, np.uint8)
        for k, (category, colour) in enumerate(colours.items()):
            x = 8 + 48 * ((k + i) % 2)  # the colours swap sides from one image to the next
            canvas[16:40, x:x + 24] = colour
            polygon = [x, 16, x + 24, 16, x + 24, 40, x, 40]
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": category, "iscrowd": 0,
                            "bbox": [x, 16, 24, 24], "area": 576, "segmentation": [polygon]})
        Image.fromarray(canvas).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 96, "height": 64})
    gt = {"images": images, "annotations": gt_anns,
          "categories": [{"id": 1, "name": "red", "supercategory": ""}, {"id": 2, "name": "green", "supercategory": ""}]}
    masks = {"images": images, "categories": [dict(OBJECT_CATEGORY)],
             "annotations": [dict(a, category_id=OBJECT_CATEGORY["id"], score=1.0) for a in gt_anns]}
    return gt, masks


def test_metrics_are_exact_on_hand_made_colour_squares(tmp_path):
    """Identical crops give identical features, so K-means (2 clusters) splits the masks exactly by colour:
    ACC, NMI and ARI are 100 and every mask gets its square's class."""
    gt, masks = _colour_squares(tmp_path / "images")
    masks["info"] = {"settings": {"arch": "vit_small", "patch_size": 16, "weights": "random"}}  # as gen_masks writes
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    metrics = cluster.cluster_masks(ClusterSettings(
        input_file=str(tmp_path / "masks.json"), image_root=str(tmp_path / "images"), gt_file=str(tmp_path / "gt.json"),
        output_file=str(tmp_path / "labelled.json"), num_workers=0, device="cpu"))
    assert metrics["matching"] == "hungarian" and metrics["num_masks_without_gt"] == 0
    assert (metrics["ACC"], metrics["NMI"], metrics["ARI"]) == pytest.approx((100.0, 100.0, 100.0))
    assert metrics["cluster_sizes"] == [4, 4]
    labelled = json.loads((tmp_path / "labelled.json").read_text())
    assert [a["category_id"] for a in labelled["annotations"]] == [a["category_id"] for a in gt["annotations"]]
    assert labelled["categories"] == gt["categories"]
    assert labelled["info"]["category_ids"] == (f"class ids of {tmp_path / 'gt.json'}: each of the 2 clusters "
                                                "takes the GT class it was matched to (hungarian matching)")


def test_dinov2_backbone_from_the_masks_and_cluster_ids_said_out_loud(tmp_path, capsys):
    """Masks recorded with a DINOv2 ViT-S/14 are clustered with it (patch size 14: a 24 px crop is padded
    to 28, a 2 x 2 grid); identical crops give identical features, so the 2 clusters are the 2 colours.
    Without ground truth the output holds cluster ids, which is written into the file and warned about:
    a GT file's class ids 1, 2 are other things with the same numbers."""
    gt, masks = _colour_squares(tmp_path / "images")
    masks["info"] = {"settings": {"arch": "dinov2_vits14", "patch_size": 14, "weights": "random"}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    out = tmp_path / "labelled.json"
    capsys.readouterr()
    metrics = cluster.cluster_masks(ClusterSettings(
        input_file=str(tmp_path / "masks.json"), image_root=str(tmp_path / "images"), output_file=str(out),
        num_classes=2, num_workers=0, device="cpu"))
    assert metrics["backbone"] == {"arch": "dinov2_vits14", "patch_size": 14, "weights": "random"}
    assert metrics["cluster_sizes"] == [4, 4]
    labelled = json.loads(out.read_text())
    ids = [a["category_id"] for a in labelled["annotations"]]
    truth = [a["category_id"] for a in gt["annotations"]]  # red 1, green 2: the clusters are the colours
    assert ids == truth or ids == [3 - c for c in truth]
    meaning = "cluster ids 1..2 (K-means clusters, not matched to any ground truth; not comparable with a GT file's class ids)"
    assert labelled["info"] == {"settings": masks["info"]["settings"], "category_ids": meaning}
    assert metrics["category_ids"] == meaning
    captured = capsys.readouterr()
    assert f"category_id in {out}: {meaning}" in captured.out
    assert captured.err.count(f"WARNING: {out} holds CLUSTER ids 1..2, not classes.") == 1
    assert "--gt_file" in captured.err and "--class_agnostic" in captured.err
    features = np.load(next(tmp_path.glob("masks.features.*.npy")))
    assert features.shape == (8, 384)


def test_backbone_comes_from_the_masks_recorded_settings(tmp_path, capsys):
    images = {1: {"id": 1, "file_name": "a.png", "width": 8, "height": 8}}
    weights = tmp_path / "dino_b8.pth"
    weights.write_bytes(b"")  # only its existence matters here

    def mask_set(path, dataset):
        return crop_features.MaskSet("target", path, tmp_path, images, [], dataset)

    # info.settings of a gen_masks.py file: used as they are, without any warning.
    recorded = {"info": {"settings": {"arch": "vit_base", "patch_size": 8, "weights": str(weights), "topk": 0.4}}}
    target = mask_set(tmp_path / "masks.json", recorded)
    assert cluster.resolve_backbone(ClusterSettings("m", "r", "o"), target) == crop_features.Backbone(
        "vit_base", 8, str(weights))
    assert capsys.readouterr().err == ""
    # A flag that differs wins, with a warning naming both values.
    chosen = cluster.resolve_backbone(ClusterSettings("m", "r", "o", patch_size=16), target)
    assert chosen == crop_features.Backbone("vit_base", 16, str(weights))
    assert capsys.readouterr().err.strip() == (f"warning: --patch_size 16 differs from the 8 that made the masks "
                                               f"({tmp_path / 'masks.json'} (info.settings)); the features use 16")
    # Recorded weights that are not here: one line saying what to pass.
    weights.unlink()
    with pytest.raises(UserError, match=r"the masks were made with --weights .*dino_b8.pth \(.*masks.json "
                                        r"\(info.settings\)\), which is not a file here; pass --weights PATH"):
        cluster.resolve_backbone(ClusterSettings("m", "r", "o"), target)
    # A results list has no info: the masks.config.yaml that gen_masks.py wrote next to it is read.
    (tmp_path / "masks.config.yaml").write_text("arch: vit_small\npatch_size: 16\nweights: random\n")
    target = mask_set(tmp_path / "masks.results.json", None)
    assert cluster.resolve_backbone(ClusterSettings("m", "r", "o"), target) == crop_features.Backbone(
        "vit_small", 16, "random")
    # Nothing recorded: gen_masks.py's defaults, said out loud.
    target = mask_set(tmp_path / "other.json", {"images": []})
    assert cluster.resolve_backbone(ClusterSettings("m", "r", "o"), target) == cluster.GEN_MASKS_BACKBONE
    assert "records no gen_masks.py settings" in capsys.readouterr().err
    # With --arch only, the patch size is the arch's (14 for DINOv2), never gen_masks.py's default 16.
    assert cluster.resolve_backbone(ClusterSettings("m", "r", "o", arch="dinov2_vits14"), target) == \
        crop_features.Backbone("dinov2_vits14", 14, "dino")
    assert capsys.readouterr().err.strip() == (f"warning: {tmp_path / 'other.json'} records no gen_masks.py settings; "
                                               "using arch dinov2_vits14, patch size 14, weights dino")

    # DINOv2 masks: the recorded arch and patch size (also when the patch size was left unset).
    for recorded_patch in (14, None):
        dinov2 = {"info": {"settings": {"arch": "dinov2_vitb14", "patch_size": recorded_patch, "weights": "random"}}}
        assert cluster.resolve_backbone(ClusterSettings("m", "r", "o"), mask_set(tmp_path / "v2.json", dinov2)) == \
            crop_features.Backbone("dinov2_vitb14", 14, "random")
    assert capsys.readouterr().err == ""
    # --arch dinov2_vits14 over masks made with DINO ViT-S/16: the recorded 16 belongs to the other arch.
    target = mask_set(tmp_path / "masks.results.json", None)  # masks.config.yaml: vit_small, 16, random
    assert cluster.resolve_backbone(ClusterSettings("m", "r", "o", arch="dinov2_vits14"), target) == \
        crop_features.Backbone("dinov2_vits14", 14, "random")
    assert "--arch dinov2_vits14 differs from the vit_small that made the masks" in capsys.readouterr().err
    with pytest.raises(UserError, match="--arch dinov2_vits14 has patch size 14, not --patch_size 16"):
        cluster.resolve_backbone(ClusterSettings("m", "r", "o", arch="dinov2_vits14", patch_size=16), target)


def test_interrupted_extraction_resumes_from_partial(tiny_coco, tmp_path):
    from utils.vit import build_vit

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

    from utils.vit import build_vit

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


def test_faiss_backend_with_the_real_library():
    """faiss' own Kmeans (pinned in env/requirements.txt): separated blobs are recovered exactly, and the
    inertia reported is the K-means objective of the returned assignment."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 20)
    feats = cluster.whiten_normalise(rng.normal(size=(3, 8))[labels] * 10 + rng.normal(size=(60, 8)))
    assign, inertia = cluster.run_kmeans(feats, feats, 3, seed=5, backend="faiss")
    assert assign.dtype == np.int64 and assign.shape == (60,)
    assert cluster_scores(assign, labels, 3, 3)["ACC"] == 1.0
    means = np.stack([feats[assign == k].mean(0) for k in range(3)])
    assert inertia == pytest.approx(float(((feats - means[assign]) ** 2).sum()), rel=1e-4)
    # Fitted on one set, assigning another: every point of the second set goes to its blob's cluster.
    odd, even = cluster.run_kmeans(feats[::2], feats[1::2], 3, seed=5, backend="faiss")[0], assign[1::2]
    assert cluster_scores(odd, labels[1::2], 3, 3)["ACC"] == 1.0 and len(odd) == len(even)
    assert cluster.run_kmeans(feats, feats, 3, seed=5, backend="auto")[0].tolist() == assign.tolist()


def test_gt_whose_ids_differ_from_the_masks_is_matched_by_file_name(tmp_path):
    """A GT numbering the same images in another order (ids 1..N unrelated to the masks' ids): the masks are
    matched to their GT boxes by file_name, so the metrics are those of the GT with the masks' own ids (100),
    not of another image's boxes (the colours swap sides from one image to the next)."""
    gt, masks = _colour_squares(tmp_path / "images")
    masks["info"] = {"settings": {"arch": "vit_small", "patch_size": 16, "weights": "random"}}
    order = [2, 0, 3, 1]  # GT image k is masks image order[k]
    new_id = {order[k] + 1: k + 1 for k in range(len(order))}
    gt["images"] = sorted(({**img, "id": new_id[img["id"]]} for img in gt["images"]), key=lambda i: i["id"])
    gt["annotations"] = [{**a, "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    code, out, err = run_main(cluster_cli.main, [
        "--input_file", str(tmp_path / "masks.json"), "--image_root", str(tmp_path / "images"),
        "--gt_file", str(tmp_path / "gt.json"), "--output_file", str(tmp_path / "labelled.json"),
        "--num_workers", "0", "--device", "cpu", "--metrics_json", str(tmp_path / "m.json")])
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_masks_without_gt"] == 0
    assert (metrics["ACC"], metrics["NMI"], metrics["ARI"]) == pytest.approx((100.0, 100.0, 100.0))


def test_a_gt_for_other_images_and_an_impossible_num_classes_are_refused_before_any_feature(tmp_path):
    gt, masks = _colour_squares(tmp_path / "images")
    masks["info"] = {"settings": {"arch": "vit_small", "patch_size": 16, "weights": "random"}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    other = {**gt, "images": [{**img, "file_name": f"other_{img['file_name']}"} for img in gt["images"]]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    base = ["--input_file", str(tmp_path / "masks.json"), "--image_root", str(tmp_path / "images"),
            "--output_file", str(tmp_path / "labelled.json"), "--num_workers", "0", "--device", "cpu"]
    code, _, err = run_main(cluster_cli.main, [*base, "--gt_file", str(tmp_path / "other.json")])
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'masks.json'}: image '0.png' (id 1) is not in {tmp_path / 'other.json'} (matched by "
        f"file_name); pass the --gt_file the predictions were made for, or make them with gen_masks.py --gt_json "
        f"{tmp_path / 'other.json'}"]
    code, _, err = run_main(cluster_cli.main, [*base, "--num_classes", "9"])  # 8 masks
    assert code == 2 and err.strip().splitlines() == [
        "error: only 8 masks to cluster into 9 clusters; lower --num_classes / --overcluster or add --support_file sets"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "masks.json", "other.json"]  # no feature cache
    cluster.check_enough_masks(8, 8)  # 8 clusters of 8 masks is possible
