"""Give every discovered mask a class without labels: ViT CLS features of the mask's box crop, K-means.

    python utils/cluster.py --input_file masks.json --image_root VOCdevkit --output_file labelled.json \
        --gt_voc_root VOCdevkit/VOC2012 --num_classes 20 --support_file voc07_masks.json --support_root VOCdevkit

Per mask: crop the image to the mask's box, normalise with the ImageNet mean/std, zero-pad to a
multiple of the patch size and take the ViT's final normalised CLS token. Crops are batched only
with crops of the same padded size, so a crop's feature never depends on its batch (padding to
the batch maximum would add tokens and change the CLS token). Features are cached as .npy next
to the output, keyed by the input file's content, the image root and the backbone, so a second
run with other clustering settings skips the network. Features of the target and the support
sets are whitened per dimension and L2-normalised; K-means is fitted on all of them and only the
target masks are labelled. With ground truth, clusters are matched to classes (Hungarian when
clusters == classes, majority when over-clustering) and ACC/NMI/ARI are reported.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
from dataclasses import dataclass

import numpy as np

from utils.coco_io import (box_iou_xywh, check_can_write, check_writable, load_coco_dataset, segmentation_to_rle,
                           write_json)
from utils.crop_features import MaskSet, cached_features, load_mask_set
from utils.errors import UserError, run_cli


# ----------------------------------------------------------------------------- clustering


def whiten_normalise(features: np.ndarray) -> np.ndarray:
    """Divide every dimension by its standard deviation (scipy's `whiten`), then L2-normalise rows."""
    from scipy.cluster.vq import whiten

    std = features.std(axis=0)
    if np.any(std == 0):  # scipy warns and leaves such dimensions unscaled; they carry no information
        features = features[:, std > 0]
    white = whiten(features.astype(np.float64))
    norms = np.linalg.norm(white, axis=1, keepdims=True)
    return (white / np.maximum(norms, 1e-12)).astype(np.float32)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def run_kmeans(fit: np.ndarray, predict: np.ndarray, num_clusters: int, seed: int, backend: str = "auto"
               ) -> tuple[np.ndarray, float]:
    """Fit K-means on `fit`, assign `predict`; returns (cluster ids, inertia on `fit`).

    `backend`: sklearn (MiniBatchKMeans), faiss, or auto (faiss if importable, else sklearn)."""
    if len(fit) < num_clusters:
        raise UserError(f"only {len(fit)} masks to cluster into {num_clusters} clusters; lower --num_classes / "
                        "--overcluster or add --support_file sets")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "sklearn"
    if backend == "faiss":
        if not faiss_available():
            raise UserError("--kmeans faiss: faiss is not installed (pip install faiss-cpu or faiss-gpu), "
                            "or use --kmeans sklearn")
        import faiss

        kmeans = faiss.Kmeans(fit.shape[1], num_clusters, niter=20, seed=seed, verbose=False,
                              max_points_per_centroid=max(1, len(fit) // num_clusters) + 1)
        kmeans.train(np.ascontiguousarray(fit, dtype=np.float32))
        _, assign = kmeans.index.search(np.ascontiguousarray(predict, dtype=np.float32), 1)
        return assign.ravel().astype(np.int64), float(kmeans.obj[-1])
    if backend != "sklearn":
        raise UserError(f"unknown --kmeans {backend!r}")
    from sklearn.cluster import MiniBatchKMeans

    kmeans = MiniBatchKMeans(n_clusters=num_clusters, random_state=seed, batch_size=1024, n_init=3)
    kmeans.fit(fit)
    return kmeans.predict(predict).astype(np.int64), float(kmeans.inertia_)


# ----------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """Per image id: GT boxes (N, 4) xywh and their class indices; and the class list."""

    categories: list[dict]
    boxes: dict  # image id -> (np.ndarray boxes, np.ndarray class indices)


def gt_from_coco(dataset: dict) -> GroundTruth:
    categories = sorted(dataset["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    grouped: dict = {}
    for i, ann in enumerate(dataset["annotations"]):
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in index:
            raise UserError(f"ground truth annotation #{i} has category_id {ann['category_id']} not in its 'categories'")
        grouped.setdefault(ann["image_id"], []).append((ann["bbox"], index[ann["category_id"]]))
    boxes = {k: (np.array([b for b, _ in v], dtype=np.float64), np.array([c for _, c in v])) for k, v in grouped.items()}
    return GroundTruth(categories, boxes)


def gt_from_voc(voc_root: str | os.PathLike, images: dict) -> GroundTruth:
    """GT boxes from VOC XML for the given images (matched by file name stem)."""
    from utils.voc import VOC_CATEGORIES, VOC_NAME_TO_ID, parse_voc_xml

    root = Path(voc_root)
    if not (root / "Annotations").is_dir():
        raise UserError(f"{root / 'Annotations'} not found; --gt_voc_root must be a VOC20XX folder")
    boxes = {}
    for image_id, img in images.items():
        xml = root / "Annotations" / f"{Path(img['file_name']).stem}.xml"
        if not xml.is_file():
            raise UserError(f"no VOC annotation {xml} for image {img['file_name']} (id {image_id})")
        objects = parse_voc_xml(xml).objects
        for obj in objects:
            if obj.name not in VOC_NAME_TO_ID:
                raise UserError(f"{xml}: unknown VOC class {obj.name!r}")
        xyxy = np.array([o.box_xyxy for o in objects], dtype=np.float64).reshape(-1, 4)
        boxes[image_id] = (np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1),
                           np.array([VOC_NAME_TO_ID[o.name] - 1 for o in objects]))
    return GroundTruth([dict(c) for c in VOC_CATEGORIES], boxes)


def gt_classes(mask_set: MaskSet, gt: GroundTruth, indices: np.ndarray) -> np.ndarray:
    """Class index of the masks at `indices`: the class of the GT box with the highest box IoU
    (-1 where no GT box overlaps the mask's box)."""
    targets = np.full(len(indices), -1, dtype=np.int64)
    for row, index in enumerate(indices):
        ann = mask_set.annotations[index]
        entry = gt.boxes.get(ann["image_id"])
        if entry is None or len(entry[0]) == 0:
            continue
        box = ann.get("bbox")
        if box is None:  # masks without a bbox: the tight box of the mask
            from pycocotools import mask as mask_utils

            img = mask_set.images[ann["image_id"]]
            box = mask_utils.toBbox(segmentation_to_rle(ann["segmentation"], img["height"], img["width"])).tolist()
        ious = box_iou_xywh(np.array([box]), entry[0])[0]
        if ious.max() > 0:
            targets[row] = entry[1][int(np.argmax(ious))]
    return targets


# ----------------------------------------------------------------------------- the job


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--input_file", required=True,
                      help="masks to label: gen_masks.py's COCO JSON, or a results list (then --gt_file gives the images)")
    data.add_argument("--image_root", required=True, help="folder the images' file_name is relative to")
    data.add_argument("--support_file", action="append", default=[],
                      help="extra masks (e.g. VOC07 for VOC12) that K-means is also fitted on; repeatable, "
                           "each with its own --support_root; support masks are not labelled")
    data.add_argument("--support_root", action="append", default=[], help="image root of each --support_file, in order")
    data.add_argument("--gt_file", default=None,
                      help="COCO GT of the target images: enables matching clusters to its classes and ACC/NMI/ARI")
    data.add_argument("--gt_voc_root", default=None,
                      help="instead of --gt_file: a VOC20XX folder whose Annotations/*.xml give the GT boxes and classes")
    out = p.add_argument_group("output")
    out.add_argument("--output_file", required=True, help="labelled COCO JSON (the input with category_id filled in)")
    out.add_argument("--metrics_json", default=None, help="write ACC/NMI/ARI, per-trial results and run info here")
    out.add_argument("--cache_dir", default=None, help="where feature caches (.npy) go (default: the output's folder)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --output_file")
    model = p.add_argument_group("backbone (as in gen_masks.py)")
    model.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base"], help="ViT size (default: %(default)s)")
    model.add_argument("--patch_size", type=int, default=8, choices=[8, 16],
                       help="ViT patch size; 8 clusters slightly better than 16 (default: %(default)s)")
    model.add_argument("--weights", default="dino", help="'dino' (official checkpoint), 'random' (tests only) or a path")
    km = p.add_argument_group("clustering")
    km.add_argument("--num_classes", type=int, default=None,
                    help="number of classes (default: the number of GT categories; required without GT)")
    km.add_argument("--overcluster", type=int, default=1,
                    help="clusters = num_classes x this factor; > 1 uses majority matching (default: %(default)s)")
    km.add_argument("--seed", type=int, default=1234, help="K-means seed of the first trial; trial t uses seed + t (default: %(default)s)")
    km.add_argument("--trials", type=int, default=1,
                    help="K-means runs; the labels come from the run with the lowest inertia (never chosen with GT), "
                         "metrics are reported per run and averaged (default: %(default)s)")
    km.add_argument("--kmeans", default="auto", choices=["auto", "sklearn", "faiss"],
                    help="K-means backend; auto = faiss if installed, else scikit-learn MiniBatchKMeans (default: %(default)s)")
    speed = p.add_argument_group("speed")
    speed.add_argument("--batch_size", type=int, default=32, help="crops per forward pass (crops of equal padded size) (default: %(default)s)")
    speed.add_argument("--num_workers", type=int, default=2, help="image decoding workers (default: %(default)s)")
    speed.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    speed.add_argument("--half", action="store_true", help="bf16 autocast for the ViT (GPUs)")
    return p


def cluster_masks(args: argparse.Namespace) -> dict:
    """The whole job: features, K-means, matching, labelled output and metrics. Returns the metrics."""
    if len(args.support_file) != len(args.support_root):
        raise UserError(f"got {len(args.support_file)} --support_file but {len(args.support_root)} --support_root; "
                        "give one root per support file")
    if args.gt_file and args.gt_voc_root:
        raise UserError("give at most one of --gt_file and --gt_voc_root")
    if args.overcluster < 1 or args.trials < 1 or args.batch_size < 1 or (args.num_classes is not None and args.num_classes < 1):
        raise UserError("--num_classes, --overcluster, --trials and --batch_size must be >= 1")
    check_can_write(args.output_file, args.overwrite)
    for path in (args.output_file, args.metrics_json):
        if path:
            check_writable(path)

    gt_dataset = load_coco_dataset(args.gt_file) if args.gt_file else None
    target = load_mask_set("target", args.input_file, args.image_root, gt_dataset, str(args.gt_file))
    supports = [load_mask_set(f"support{i}", f, r) for i, (f, r) in enumerate(zip(args.support_file, args.support_root))]
    gt = gt_from_coco(gt_dataset) if gt_dataset else gt_from_voc(args.gt_voc_root, target.images) if args.gt_voc_root else None
    num_classes = args.num_classes or (len(gt.categories) if gt else None)
    if not num_classes:
        raise UserError("--num_classes is required without ground truth")
    num_clusters = num_classes * args.overcluster

    # Features (cached), for the target and every support set.
    output = Path(args.output_file)
    cache_dir = Path(args.cache_dir) if args.cache_dir else output.parent
    check_writable(cache_dir / f"{output.stem}.features.npy")
    model_holder: list = []

    def get_model():
        if not model_holder:
            import torch

            from distill.vit import build_vit
            from utils.distributed import resolve_device

            torch.manual_seed(args.seed)  # makes --weights random reproducible (and its cache valid)
            device = resolve_device(args.device)
            model_holder.append((build_vit(args.arch, args.patch_size, args.weights).to(device), device))
        return model_holder[0]

    feats = [cached_features(s, cache_dir, output.stem, args, get_model) for s in [target, *supports]]
    valid = [np.isfinite(f).all(axis=1) for f in feats]
    if not valid[0].any():
        raise UserError(f"no usable mask in {args.input_file}")
    white = whiten_normalise(np.concatenate([f[v] for f, v in zip(feats, valid)]))
    target_white = white[: int(valid[0].sum())]
    target_index = np.flatnonzero(valid[0])  # annotation index of each target row

    targets = gt_classes(target, gt, target_index) if gt else None
    labelled = targets >= 0 if gt else None
    trials = []
    for t in range(args.trials):
        assign, inertia = run_kmeans(white, target_white, num_clusters, args.seed + t, args.kmeans)
        trial = {"seed": args.seed + t, "inertia": inertia, "assign": assign}
        if gt is not None and labelled.any():
            from utils.metrics import cluster_scores

            scores = cluster_scores(assign[labelled], targets[labelled], num_clusters, len(gt.categories))
            trial.update({k: 100.0 * scores[k] for k in ("ACC", "NMI", "ARI")},
                         mapping=scores["mapping"], matching=scores["matching"])
            print(f"trial {t} (seed {args.seed + t}): ACC {trial['ACC']:.2f}  NMI {trial['NMI']:.2f}  ARI {trial['ARI']:.2f}")
        trials.append(trial)
    chosen = min(range(len(trials)), key=lambda i: trials[i]["inertia"])
    assign = trials[chosen]["assign"]

    # Category ids: matched GT classes, or clusters 1..K without GT.
    if gt is not None and "mapping" in trials[chosen]:
        mapping = trials[chosen]["mapping"]
        cluster_to_category = {k: gt.categories[mapping.get(k, 0)]["id"] for k in range(num_clusters)}
        categories = [dict(c) for c in gt.categories]
    else:
        cluster_to_category = {k: k + 1 for k in range(num_clusters)}
        categories = [{"id": k + 1, "name": f"cluster_{k + 1}", "supercategory": ""} for k in range(num_clusters)]
    annotations = []
    for row, index in enumerate(target_index):
        ann = dict(target.annotations[index])
        ann["category_id"] = int(cluster_to_category[int(assign[row])])
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", int(index) + 1)
        annotations.append(ann)
    base = dict(target.dataset) if target.dataset is not None else {}
    base.update(images=list(target.images.values()) if target.dataset is None else target.dataset["images"],
                annotations=annotations, categories=categories)
    write_json(output, base)

    metrics: dict = {
        "input_file": str(args.input_file), "output_file": str(output),
        "num_masks": len(target.annotations), "num_labelled_masks": len(annotations),
        "num_support_masks": int(sum(v.sum() for v in valid[1:])),
        "num_skipped": sum(len(s.skipped) for s in [target, *supports]),
        "skipped": {s.name: s.skipped[:1000] for s in [target, *supports] if s.skipped},
        "num_classes": num_classes, "num_clusters": num_clusters,
        "kmeans": ("faiss" if faiss_available() else "sklearn") if args.kmeans == "auto" else args.kmeans,
        "chosen_trial": chosen,
        "cluster_sizes": np.bincount(assign, minlength=num_clusters).tolist(),
        "cluster_to_category": {str(k): v for k, v in cluster_to_category.items()},
        "trials": [{k: v for k, v in t.items() if k != "assign"} | ({"mapping": {str(a): b for a, b in t["mapping"].items()}} if "mapping" in t else {})
                   for t in trials],
        "settings": {k: v for k, v in vars(args).items()},
    }
    if gt is not None:
        metrics["num_masks_without_gt"] = int((~labelled).sum())
        if labelled.any():
            for name in ("ACC", "NMI", "ARI"):
                values = [t[name] for t in trials]
                metrics[name], metrics[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
            metrics["matching"] = trials[chosen]["matching"]
    if args.metrics_json:
        write_json(args.metrics_json, metrics, indent=2)

    print(f"labelled {len(annotations)} masks into {num_clusters} clusters -> {output}")
    if metrics["num_skipped"]:
        print(f"skipped {metrics['num_skipped']} masks with empty or out-of-image boxes (see warnings above)")
    if gt is not None and "ACC" in metrics:
        if metrics["num_masks_without_gt"]:
            print(f"{metrics['num_masks_without_gt']} masks overlap no GT box and are left out of the metrics")
        print(f"{metrics['matching']} matching over {args.trials} trial(s): ACC {metrics['ACC']:.2f}  "
              f"NMI {metrics['NMI']:.2f}  ARI {metrics['ARI']:.2f}")
    return metrics


def main() -> None:
    cluster_masks(build_parser().parse_args())


if __name__ == "__main__":
    run_cli(main)
