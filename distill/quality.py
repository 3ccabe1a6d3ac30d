"""Discovery quality against ground truth: each method x setting next to the whole-image baseline.

For every image that has at least one non-crowd GT instance, the method's most confident mask
is scored two ways:

* mask IoU: its IoU with the best-matching GT instance mask;
* CorLoc hit: its tight box has IoU >= 0.5 with at least one GT box (CorLoc = the share of hits).

The whole-image baseline scores a mask covering the whole image the same way, so a setting that
merely returns the image (as MaskDistill on raw DINOv2 keys does) scores exactly the baseline.
A setting (`DiscoveryRun`) is a method with its parameters, feature setting and input policy;
`discovery_runs` fills in what is left out with the method's default on the backbone, so the
default runs score what `gen_masks.py --arch A --method M` does by default. Images are
preprocessed exactly as by gen_masks.py (`distill.data.MaskGenDataset`) and run one at a time,
so the figures do not depend on batching. `benchmarks/bench_discovery_quality.py` is the
command line; docs/dinov2.md holds the measured table.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from distill.data import Geometry, ImageEntry, InputPolicy, MaskGenDataset, folder_entries, voc_entries
from distill.features import needs_tokens
from distill.methods import method_defaults, method_features, patch_features, pixel_masks, propose
from distill.registry import load_method, method_names
from utils.vit import DinoViT, LastBlockQK
from evaluation.corloc import corloc_hit
from utils.coco_io import load_coco_dataset, mask_to_bbox, segmentation_to_rle
from utils.errors import UserError
from utils.images import read_size
from utils.precision import autocast
from utils.progress import Progress
from utils.voc import convert_voc_instances

@dataclass
class GroundTruthSet:
    """Images with their non-crowd GT instances (RLEs and `[x, y, w, h]` boxes, original size)."""

    name: str
    entries: list[ImageEntry]
    masks: dict[int, list[dict]]  # image id -> RLEs
    boxes: dict[int, np.ndarray]  # image id -> (n, 4)


def _ground_truth(name: str, entries: list[ImageEntry], dataset: dict) -> GroundTruthSet:
    sizes = {img["id"]: (img["height"], img["width"]) for img in dataset["images"]}
    masks: dict[int, list[dict]] = {}
    boxes: dict[int, list] = {}
    for ann in dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = segmentation_to_rle(ann["segmentation"], *sizes[ann["image_id"]])
        masks.setdefault(ann["image_id"], []).append(rle)
        boxes.setdefault(ann["image_id"], []).append(ann["bbox"] if "bbox" in ann else mask_utils.toBbox(rle).tolist())
    kept = [e for e in entries if e.image_id in masks]  # images without GT instances do not count
    return GroundTruthSet(name, kept, masks, {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in boxes.items()})


def coco_ground_truth(image_folder: Path, annotation_json: Path, name: str = "coco") -> GroundTruthSet:
    """A COCO image folder (integer file names = image ids) and its instances JSON."""
    return _ground_truth(name, folder_entries(image_folder, "filename"), load_coco_dataset(annotation_json))


def voc_ground_truth(vocdevkit: Path, year: str = "2012", image_set: str = "trainval", name: str = "voc") -> GroundTruthSet:
    """VOC images of `ImageSets/Segmentation/<image_set>.txt` with their SegmentationObject instances."""
    entries = voc_entries(vocdevkit, year, image_set, "Segmentation")
    dataset = convert_voc_instances(vocdevkit / f"VOC{year}", image_set, progress=False)
    return _ground_truth(name, entries, dataset)


PETS_STRIDE = 10  # the pets set: every 10th image by file name (60 of the 600 photos, every breed)


def shared_ground_truth(data_root: Path, names: list[str]) -> list[GroundTruthSet]:
    """The shared test images: `tiny_coco` (val2017), `voc_mini` and `pets` (every `PETS_STRIDE`-th image of the
    Oxford-IIIT Pets sample, ids from its instances.json by file name), from ../shared/data."""
    sets = []
    for name in names:
        if name == "pets":
            folder, gt_json = data_root / "pets", data_root / "pets" / "annotations" / "instances.json"
            entries = folder_entries(folder / "images", f"from:{gt_json}")[::PETS_STRIDE]
            sets.append(_ground_truth(f"pets (every {PETS_STRIDE}th)", entries, load_coco_dataset(gt_json)))
        elif name == "tiny_coco":
            folder = data_root / "tiny_coco"
            sets.append(coco_ground_truth(folder / "val2017", folder / "annotations" / "instances_val2017.json",
                                          "tiny_coco val2017"))
        elif name == "voc_mini":
            sets.append(voc_ground_truth(data_root / "voc_mini" / "VOCdevkit", name="voc_mini"))
        else:
            raise UserError(f"unknown data set {name!r}; choose tiny_coco, voc_mini or pets")
    return sets


def score_mask(mask: np.ndarray, gt_masks: list[dict], gt_boxes: np.ndarray) -> tuple[float, bool]:
    """(best mask IoU with a GT instance, CorLoc hit) of one predicted full-size binary mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    best_iou = float(mask_utils.iou([rle], gt_masks, [0] * len(gt_masks)).max())
    return best_iou, corloc_hit(mask_to_bbox(mask), gt_boxes)  # the evaluators' rule


@dataclass
class Score:
    ious: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)

    def add(self, iou_and_hit: tuple[float, bool]) -> None:
        self.ious.append(iou_and_hit[0])
        self.hits.append(iou_and_hit[1])

    def summary(self) -> dict:
        return {"images": len(self.ious), "mask_iou": float(np.mean(self.ious)) if self.ious else float("nan"),
                "corloc": 100.0 * float(np.mean(self.hits)) if self.hits else float("nan"),
                "hits": int(sum(self.hits))}


@dataclass(frozen=True)
class DiscoveryRun:
    """One scored configuration: a method, its parameters, the feature setting and the input policy."""

    method: str
    features: str
    params: tuple[tuple[str, object], ...]  # (name, value), the method's parameters in order
    resize: int  # shorter side (0: full resolution)
    fixed_size: int  # square side (0: none); excludes resize

    @property
    def input(self) -> str:
        if self.fixed_size:
            return f"{self.fixed_size} x {self.fixed_size} square"
        return f"shorter side {self.resize}" if self.resize else "full resolution"


def discovery_runs(arch: str, methods: list[str], settings: list[str], resize: int | None = None,
                   params: dict[str, list] | None = None) -> list[DiscoveryRun]:
    """Every method x feature setting x listed parameter value, on `arch`. Left out (None / `auto`),
    a parameter, the feature setting and the input are the method's default on `arch`
    (`distill.methods.method_defaults`); `resize` given puts every method on that shorter side.
    params: parameter name -> values to try, for the methods that have the parameter."""
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise UserError(f"unknown --method {unknown[0]!r}; choose from {list(method_names())}")
    runs = []
    for name in methods:
        defaults = method_defaults(name, arch)
        choices = [[(key, value) for value in (params or {}).get(key, [None])] for key in load_method(name).params]
        size = (defaults["resize"], defaults["fixed_size"]) if resize is None else (resize, 0)
        for setting in settings:
            features = method_features(name, arch, setting)
            for chosen in itertools.product(*choices):
                values = tuple((key, defaults[key] if value is None else value) for key, value in chosen)
                runs.append(DiscoveryRun(name, features, values, *size))
    return list(dict.fromkeys(runs))


def evaluate_discovery(model: DinoViT, gt_sets: list[GroundTruthSet], runs: list[DiscoveryRun], max_size: int = 2048,
                       max_images: int = 0, dtype: torch.dtype = torch.float32,
                       device: torch.device = torch.device("cpu"), progress: bool | None = None) -> dict:
    """Scores per data set: `baseline` (whole image) and every run, plus the seconds spent in the
    backbone. Per image, one backbone pass per input policy (the image resized as gen_masks.py does,
    `max_size` capping the longer side) serves every run with that input; MaskCut's CRF runs on
    that resized image."""
    by_input: dict[tuple[int, int], list[DiscoveryRun]] = {}
    for run in runs:
        by_input.setdefault((run.resize, run.fixed_size), []).append(run)
    results: dict = {}
    for gt in gt_sets:
        entries = gt.entries[:max_images] if max_images else gt.entries
        sizes = {e.index: read_size(e.path) for e in entries}
        datasets = {size: MaskGenDataset(entries, sizes, InputPolicy(size[0], max_size, size[1], model.patch_size),
                                         keep_working=any(load_method(r.method).refine is not None for r in group))
                    for size, group in by_input.items()}
        scores = {"baseline": Score(), **{run: Score() for run in runs}}
        model_seconds = 0.0
        for entry in Progress(entries, desc=gt.name, unit="img", enabled=progress is not False):
            original = sizes[entry.index]
            gt_masks, gt_boxes = gt.masks[entry.image_id], gt.boxes[entry.image_id]
            scores["baseline"].add(score_mask(np.ones(original, dtype=bool), gt_masks, gt_boxes))
            for size, group in by_input.items():
                item = datasets[size][entry.index]
                if item["image"] is None:
                    raise UserError(f"cannot read {entry.path}: {item['error']}")
                geometry = datasets[size].geometry(entry.index)
                start = time.perf_counter()
                tokens = any(needs_tokens(run.features) for run in group)
                with torch.inference_mode(), autocast(dtype, device):
                    qk = model.last_qk(item["image"][None].to(device), tokens=tokens)
                model_seconds += time.perf_counter() - start
                for run in group:
                    mask = _top_mask(run, qk, item["working"], geometry)
                    scores[run].add(score_mask(mask, gt_masks, gt_boxes))
        results[gt.name] = {"scores": {k: v.summary() for k, v in scores.items()}, "model_seconds": model_seconds,
                            "images": len(entries)}
    return results


def _top_mask(run: DiscoveryRun, qk: LastBlockQK, working: np.ndarray | None, geometry: Geometry) -> np.ndarray:
    """The most confident original-size mask of `run` on one image's backbone output (empty if none)."""
    method = load_method(run.method)
    with torch.inference_mode():
        proposals = propose(method, patch_features(qk, run.features, geometry.grid), dict(run.params))[0]
    masks = pixel_masks(method, working, proposals, geometry)
    kept = [(p.score, m) for p, m in zip(proposals, masks) if m is not None]
    return max(kept, key=lambda pair: pair[0])[1] if kept else np.zeros(geometry.original, dtype=bool)


# ----------------------------------------------------------------------------- agreement of two mask sets


def matched_mask_iou(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    """Agreement of two sets of masks of one image: the IoUs of a one-to-one Hungarian matching
    (scipy's `linear_sum_assignment`, maximising the IoU sum), summed and divided by the larger
    count, so an unmatched mask counts 0. Two empty sets agree (1.0); one empty set scores 0."""
    from scipy.optimize import linear_sum_assignment

    if not first or not second:
        return float(not first and not second)
    a = np.stack([m.reshape(-1) for m in first]).astype(np.float32)
    b = np.stack([m.reshape(-1) for m in second]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / max(len(first), len(second)))


def masks_by_file_name(dataset: dict) -> dict[str, list[np.ndarray]]:
    """A COCO mask file's masks per image base name (every image listed, also those without masks).
    Each RLE is decoded at its own `size`, so a file whose `images` swap width and height (CutLER's
    maskcut.py) still decodes right."""
    images = {img["id"]: img for img in dataset["images"]}
    masks: dict[str, list[np.ndarray]] = {Path(img["file_name"]).name: [] for img in images.values()}
    for ann in dataset["annotations"]:
        img, segm = images[ann["image_id"]], ann["segmentation"]
        height, width = segm["size"] if isinstance(segm, dict) and "size" in segm else (img["height"], img["width"])
        masks[Path(img["file_name"]).name].append(mask_utils.decode(segmentation_to_rle(segm, height, width)) > 0)
    return masks


def mask_file_agreement(first: dict, second: dict) -> dict[str, float]:
    """`matched_mask_iou` per image of two COCO mask files of the same images (matched by base name);
    an image in only one file raises, since the files would not describe the same run."""
    a, b = masks_by_file_name(first), masks_by_file_name(second)
    if set(a) != set(b):
        first_only, second_only = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise UserError(f"the two mask files list different images ({len(first_only)} only in the first, e.g. "
                        f"{first_only[:1]}; {len(second_only)} only in the second, e.g. {second_only[:1]}); "
                        "compare runs on the same images")
    return {name: matched_mask_iou(a[name], b[name]) for name in sorted(a)}
