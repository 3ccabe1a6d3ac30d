"""The clustering stage: give every discovered mask a class without labels, from ViT CLS features of
the mask's box crop and K-means. `python utils/cluster.py` is its command line.

The backbone (arch, patch size, weights) is the one that made the masks: it is read from the settings
gen_masks.py records (`info.settings` in the masks file, or `<stem>.config.yaml` next to it), so the
two cannot disagree; `ClusterSettings` fields override it, with a warning when they differ. Features
of the target and the support sets (distill/crop_features.py, cached by content) are whitened per
dimension and L2-normalised; K-means is fitted on all of them and only the target masks are labelled.
With ground truth, clusters are matched to classes (Hungarian when clusters == classes, majority when
over-clustering) and ACC/NMI/ARI are reported.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distill.crop_features import Backbone, MaskSet, cache_path, cached_features, load_mask_set
from utils.cli import check_outputs
from utils.coco_io import box_iou_xywh, check_writable, load_coco_dataset, segmentation_to_rle, write_json
from utils.errors import UserError

# gen_masks.py's defaults: the backbone of masks files that record no settings.
GEN_MASKS_BACKBONE = Backbone(arch="vit_small", patch_size=16, weights="dino")
BACKBONE_KEYS = ("arch", "patch_size", "weights")


@dataclass
class ClusterSettings:
    """Everything the clustering job needs (utils/cluster.py --help explains each field)."""

    input_file: str
    image_root: str
    output_file: str
    support_file: list[str] = field(default_factory=list)
    support_root: list[str] = field(default_factory=list)
    gt_file: str | None = None
    gt_voc_root: str | None = None
    metrics_json: str | None = None
    cache_dir: str | None = None
    overwrite: bool = False
    arch: str | None = None  # None: the masks' recorded backbone
    patch_size: int | None = None
    weights: str | None = None
    num_classes: int | None = None
    overcluster: int = 1
    seed: int = 1234
    trials: int = 1
    kmeans: str = "auto"
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    half: bool = False


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


def check_enough_masks(num_masks: int, num_clusters: int) -> None:
    if num_masks < num_clusters:
        raise UserError(f"only {num_masks} masks to cluster into {num_clusters} clusters; lower --num_classes / "
                        "--overcluster or add --support_file sets")


def run_kmeans(fit: np.ndarray, predict: np.ndarray, num_clusters: int, seed: int, backend: str = "auto"
               ) -> tuple[np.ndarray, float]:
    """Fit K-means on `fit`, assign `predict`; returns (cluster ids, inertia on `fit`).

    `backend`: sklearn (MiniBatchKMeans), faiss, or auto (faiss if importable, else sklearn)."""
    check_enough_masks(len(fit), num_clusters)
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


def gt_from_voc(voc_root: str | Path, images: dict) -> GroundTruth:
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


def check_settings(settings: ClusterSettings) -> None:
    """Every check that needs no data, before anything is read or written."""
    if len(settings.support_file) != len(settings.support_root):
        raise UserError(f"got {len(settings.support_file)} --support_file but {len(settings.support_root)} "
                        "--support_root; give one root per support file")
    if settings.gt_file and settings.gt_voc_root:
        raise UserError("give at most one of --gt_file and --gt_voc_root")
    for name in ("overcluster", "trials", "batch_size", "num_classes"):
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if settings.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {settings.num_workers}")
    check_outputs(settings.output_file, settings.metrics_json, folders=[settings.cache_dir], overwrite=settings.overwrite)


def recorded_backbone(mask_set: MaskSet) -> tuple[dict, str] | None:
    """The backbone settings gen_masks.py recorded for these masks, and where they were found: the file's
    `info.settings`, else `<stem>.config.yaml` next to it (for a results list `X.results.json`, `X.config.yaml`)."""
    info = (mask_set.dataset or {}).get("info")
    settings = info.get("settings") if isinstance(info, dict) else None
    if isinstance(settings, dict) and any(k in settings for k in BACKBONE_KEYS):
        return settings, f"{mask_set.json_path} (info.settings)"
    path = mask_set.json_path
    stems = [path.stem] + ([path.name[: -len(".results.json")]] if path.name.endswith(".results.json") else [])
    for stem in stems:
        candidate = path.with_name(f"{stem}.config.yaml")
        if candidate.is_file():
            import yaml

            try:
                recorded = yaml.safe_load(candidate.read_text())
            except yaml.YAMLError:
                raise UserError(f"{candidate} (the settings that made {path}) is not valid YAML") from None
            if isinstance(recorded, dict) and any(k in recorded for k in BACKBONE_KEYS):
                return recorded, str(candidate)
    return None


def resolve_backbone(settings: ClusterSettings, target: MaskSet) -> Backbone:
    """The masks' recorded backbone; a field set in `settings` wins, with a warning when it differs.
    The patch size follows the arch (`utils.vit_archs.resolve_patch_size`: 14 for DINOv2, 16 for DINO
    ViT-S by default): a recorded patch size is only reused with the arch it was recorded with."""
    from utils.vit_archs import resolve_patch_size

    recorded = recorded_backbone(target)
    chosen = {}
    for key in BACKBONE_KEYS:
        given = getattr(settings, key)
        made_with = recorded[0].get(key) if recorded else None
        if given is not None and made_with is not None and given != made_with:
            print(f"warning: --{key} {given} differs from the {made_with} that made the masks "
                  f"({recorded[1]}); the features use {given}", file=sys.stderr)
        chosen[key] = given if given is not None else made_with
    arch = str(chosen["arch"] or GEN_MASKS_BACKBONE.arch)
    recorded_arch = (recorded[0].get("arch") if recorded else None) or GEN_MASKS_BACKBONE.arch
    patch_size = settings.patch_size if settings.patch_size is not None else (
        chosen["patch_size"] if recorded_arch == arch else None)
    patch_size = resolve_patch_size(arch, None if patch_size is None else int(patch_size))
    weights = str(chosen["weights"] or GEN_MASKS_BACKBONE.weights)
    if recorded is None and any(getattr(settings, key) is None for key in BACKBONE_KEYS):
        print(f"warning: {target.json_path} records no gen_masks.py settings; using arch {arch}, "
              f"patch size {patch_size}, weights {weights}", file=sys.stderr)
    if settings.weights is None and weights not in ("dino", "random") and not Path(weights).is_file():
        raise UserError(f"the masks were made with --weights {weights} ({recorded[1] if recorded else 'default'}), "
                        f"which is not a file here; pass --weights PATH (the same checkpoint)")
    return Backbone(arch, patch_size, weights)


def label_categories(gt: GroundTruth | None, trial: dict, num_clusters: int) -> tuple[dict[int, int], list[dict]]:
    """(cluster -> category id, categories): the matched GT classes, or clusters 1..K without GT."""
    if gt is not None and "mapping" in trial:
        mapping = trial["mapping"]
        return ({k: gt.categories[mapping.get(k, 0)]["id"] for k in range(num_clusters)},
                [dict(c) for c in gt.categories])
    return ({k: k + 1 for k in range(num_clusters)},
            [{"id": k + 1, "name": f"cluster_{k + 1}", "supercategory": ""} for k in range(num_clusters)])


def category_id_meaning(gt: GroundTruth | None, trial: dict, settings: ClusterSettings, num_clusters: int) -> str:
    """What the written `category_id`s are, in words (kept in the output's `info.category_ids`)."""
    if gt is None or "mapping" not in trial:
        return (f"cluster ids 1..{num_clusters} (K-means clusters, not matched to any ground truth; "
                "not comparable with a GT file's class ids)")
    source = settings.gt_file or f"{settings.gt_voc_root} (VOC)"
    return (f"class ids of {source}: each of the {num_clusters} clusters takes the GT class it was matched to "
            f"({trial['matching']} matching)")


def cluster_masks(settings: ClusterSettings) -> dict:
    """The whole stage: features, K-means, matching, labelled output and metrics. Returns the metrics."""
    check_settings(settings)
    gt_dataset = load_coco_dataset(settings.gt_file) if settings.gt_file else None
    target = load_mask_set("target", settings.input_file, settings.image_root, gt_dataset, str(settings.gt_file))
    supports = [load_mask_set(f"support{i}", f, r)
                for i, (f, r) in enumerate(zip(settings.support_file, settings.support_root))]
    gt = (gt_from_coco(gt_dataset) if gt_dataset else
          gt_from_voc(settings.gt_voc_root, target.images) if settings.gt_voc_root else None)
    if gt is not None and target.gt_ids is not None:  # matched by file_name: GT boxes under the masks' image ids
        gt.boxes = {image_id: gt.boxes[gt_id] for image_id, gt_id in target.gt_ids.items() if gt_id in gt.boxes}
    num_classes = settings.num_classes or (len(gt.categories) if gt else None)
    if not num_classes:
        raise UserError("--num_classes is required without ground truth")
    num_clusters = num_classes * settings.overcluster
    check_enough_masks(sum(len(s.annotations) for s in [target, *supports]), num_clusters)  # before any feature

    # Features (cached by content), for the target and every support set.
    backbone = resolve_backbone(settings, target)
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    caches = [cache_path(s, cache_dir, backbone, settings.half) for s in [target, *supports]]
    for path in caches:
        check_writable(path)
    model_holder: list = []

    def get_model():
        if not model_holder:
            from utils.vit import build_vit
            from utils.distributed import resolve_device

            device = resolve_device(settings.device)
            model_holder.append((build_vit(backbone.arch, backbone.patch_size, backbone.weights).to(device), device))
        return model_holder[0]

    feats = [cached_features(s, path, backbone, settings.half, settings.batch_size, settings.num_workers, get_model)
             for s, path in zip([target, *supports], caches)]
    valid = [np.isfinite(f).all(axis=1) for f in feats]
    if not valid[0].any():
        raise UserError(f"no usable mask in {settings.input_file}")
    white = whiten_normalise(np.concatenate([f[v] for f, v in zip(feats, valid)]))
    target_white = white[: int(valid[0].sum())]
    target_index = np.flatnonzero(valid[0])  # annotation index of each target row

    targets = gt_classes(target, gt, target_index) if gt else None
    labelled = targets >= 0 if gt else None
    trials = []
    for t in range(settings.trials):
        seed = settings.seed + t
        assign, inertia = run_kmeans(white, target_white, num_clusters, seed, settings.kmeans)
        trial = {"seed": seed, "inertia": inertia, "assign": assign}
        if gt is not None and labelled.any():
            from evaluation.metrics import cluster_scores

            scores = cluster_scores(assign[labelled], targets[labelled], num_clusters, len(gt.categories))
            trial.update({k: 100.0 * scores[k] for k in ("ACC", "NMI", "ARI")},
                         mapping=scores["mapping"], matching=scores["matching"])
            print(f"trial {t} (seed {seed}): ACC {trial['ACC']:.2f}  NMI {trial['NMI']:.2f}  ARI {trial['ARI']:.2f}")
        trials.append(trial)
    chosen = min(range(len(trials)), key=lambda i: trials[i]["inertia"])
    assign = trials[chosen]["assign"]

    cluster_to_category, categories = label_categories(gt, trials[chosen], num_clusters)
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
    meaning = category_id_meaning(gt, trials[chosen], settings, num_clusters)
    info = dict(base["info"]) if isinstance(base.get("info"), dict) else {}
    base["info"] = info | {"category_ids": meaning}
    output = Path(settings.output_file)
    write_json(output, base)

    metrics: dict = {
        "input_file": str(settings.input_file), "output_file": str(output),
        "num_masks": len(target.annotations), "num_labelled_masks": len(annotations),
        "num_support_masks": int(sum(v.sum() for v in valid[1:])),
        "num_skipped": sum(len(s.skipped) for s in [target, *supports]),
        "skipped": {s.name: s.skipped[:1000] for s in [target, *supports] if s.skipped},
        "num_classes": num_classes, "num_clusters": num_clusters,
        "kmeans": ("faiss" if faiss_available() else "sklearn") if settings.kmeans == "auto" else settings.kmeans,
        "backbone": asdict(backbone),
        "feature_caches": [str(p) for p in caches],
        "chosen_trial": chosen,
        "cluster_sizes": np.bincount(assign, minlength=num_clusters).tolist(),
        "cluster_to_category": {str(k): v for k, v in cluster_to_category.items()},
        "trials": [{k: v for k, v in t.items() if k != "assign"}
                   | ({"mapping": {str(a): b for a, b in t["mapping"].items()}} if "mapping" in t else {})
                   for t in trials],
        "settings": asdict(settings),
    }
    if gt is not None:
        metrics["num_masks_without_gt"] = int((~labelled).sum())
        if labelled.any():
            for name in ("ACC", "NMI", "ARI"):
                values = [t[name] for t in trials]
                metrics[name], metrics[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
            metrics["matching"] = trials[chosen]["matching"]
    if settings.metrics_json:
        write_json(settings.metrics_json, metrics, indent=2)

    metrics["category_ids"] = meaning
    print(f"labelled {len(annotations)} masks into {num_clusters} clusters -> {output}")
    print(f"category_id in {output}: {meaning}")
    if "mapping" not in trials[chosen]:  # no GT, or no mask overlapping a GT box
        print(f"WARNING: {output} holds CLUSTER ids 1..{num_clusters}, not classes. A GT file's category ids "
              f"(COCO: 1 person, 2 bicycle, ...) are other things with the same numbers: class-aware AP against "
              f"it compares unrelated ids and scores about 0. Pass that GT to utils/cluster.py as --gt_file "
              f"(or --gt_voc_root) so the clusters are matched to its classes, or evaluate with --class_agnostic.",
              file=sys.stderr)
    if metrics["num_skipped"]:
        print(f"skipped {metrics['num_skipped']} masks with empty or out-of-image boxes (see warnings above)")
    if gt is not None and "ACC" in metrics:
        if metrics["num_masks_without_gt"]:
            print(f"{metrics['num_masks_without_gt']} masks overlap no GT box and are left out of the metrics")
        print(f"{metrics['matching']} matching over {settings.trials} trial(s): ACC {metrics['ACC']:.2f}  "
              f"NMI {metrics['NMI']:.2f}  ARI {metrics['ARI']:.2f}")
    return metrics
