"""The pipeline's `eval` step: every metric of the run as rows of the one metric interface
(evaluation/rows.py), each with what it was measured against, written to OUT/eval/metrics.json.

Without --gt_json only the GT-free agreement of the last Mask R-CNN round with its own training
pseudo-labels is measured; with it: the masks' AP and CorLoc, the clustering's ACC/NMI/ARI, the
detector's AP and DeepLab's mIoU against the GT, and a gallery of the masks next to the GT masks.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.rows import MetricRow, rows_to_json
from orchestrate.settings import cluster_settings
from utils.coco_io import gt_ids_by_file_name, load_coco_dataset, write_json

if TYPE_CHECKING:
    from orchestrate.settings import PipelineSettings

GALLERY = "gallery"  # OUT/eval/gallery/index.html: the masks next to the GT masks (with --gt_json)


# DeepLab's K-means is fitted on the embeddings of at most this many images (evenly spaced), then every image is
# assigned: on 2 CPU cores the ViT DeepLab embeds about 2 photos/s, so a full second pass over 500 photos would
# cost some 4 minutes of the route's 60-minute budget (docs/pipeline.md).
KMEANS_FIT_IMAGES = 100
RUN_GT = "gt_of_the_run.json"  # OUT/eval/: --gt_json restricted to the images the run has masks for


def run_ground_truth(gt_json: str, masks: str, folder: Path) -> tuple[Path, str]:
    """`gt_json` restricted to the run's images (those of the masks file, matched by file name): a GT of a larger
    set, or a folder image that could not be read, must not count as missed objects or missing label maps. Writes
    it to `folder`/RUN_GT; returns its path and a description for the report."""
    gt = load_coco_dataset(gt_json)
    images = load_coco_dataset(masks)["images"]
    remap = gt_ids_by_file_name(images, gt["images"], masks, gt_json, "--gt_json")
    kept = set(remap.values()) if remap is not None else {img["id"] for img in images}
    subset = {**gt, "images": [img for img in gt["images"] if img["id"] in kept],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in kept]}
    path = folder / RUN_GT
    write_json(path, subset)
    shown = f"{len(subset['images'])} of its {len(gt['images'])} images" if len(kept) < len(gt["images"]) \
        else f"{len(gt['images'])} images"
    return path, f"{Path(gt_json).name} ({shown}, {len(subset['annotations'])} objects, class-agnostic)"


def instance_metrics(predictions: str, gt: str, against: str, stage: str, label: str) -> list[MetricRow]:
    """Class-agnostic mask and box AP/AP50 of `predictions` against the COCO dataset `gt`."""
    from evaluation.coco_eval import EvalOptions, ap_rows, evaluate_instances

    result = evaluate_instances(predictions, gt, EvalOptions(iou_types=("bbox", "segm"), class_agnostic=True))
    return ap_rows(result, label, against, stage)


def semantic_ground_truth(gt_json: str, folder: Path) -> tuple[Path, Path, list[str]]:
    """The GT instances painted into VOC-palette class maps (contiguous class ids, 0 = background)."""
    from segmentation.painting import generate_segmentation

    gt = load_coco_dataset(gt_json)
    scored = [{**a, "score": 1.0} for a in gt["annotations"] if not a.get("iscrowd")]
    results = folder / "gt_instances_scored.json"
    write_json(results, scored)
    stats = generate_segmentation(results, gt_json, folder / "gt_semantic", folder / "gt_semantic.txt", 0.0,
                                  class_ids="contiguous", overwrite=True, keep_empty=True)
    order = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    return Path(stats["label_dir"]), Path(stats["list"]), ["background"] + [names[c] for c in order]


def miou_metrics(s: PipelineSettings, results: dict, folder: Path, gt_json: Path) -> list[MetricRow]:
    import torch

    from segmentation.data import EvalTransform, SegmentationDataset, read_image_list
    from segmentation.engine import load_trained_model
    from segmentation.kmeans_eval import clusters_miou_row, evaluate_clusters
    from utils.distributed import resolve_device

    label_dir, list_path, class_names = semantic_ground_truth(str(gt_json), folder)
    names = read_image_list(list_path)
    device = resolve_device(s.device)
    deeplab = results["deeplab"]
    model = load_trained_model(deeplab["config"], deeplab["checkpoint"], device)
    image_dir = Path(s.images).resolve() / results["semantic"].get("image_subdir", "")
    dataset = SegmentationDataset(str(image_dir), names, str(label_dir), len(class_names), EvalTransform())
    with torch.inference_mode():
        table = evaluate_clusters(model, dataset, len(class_names), class_names, device,
                                  max_fit_pixels=20_000 if s.tiny else 200_000, max_fit_images=KMEANS_FIT_IMAGES)
    write_json(folder / "miou.json", {**table, "mapping": {str(k): v for k, v in table["mapping"].items()}}, indent=1)
    return [clusters_miou_row(table, "DeepLab", f"{Path(s.gt_json).name} painted into {len(class_names)}-class maps "
                                                f"({len(names)} images)", "deeplab")]


def masks_gallery(s: PipelineSettings, masks: str, folder: Path, gt_json: Path) -> str:
    """The masks beside the GT masks of each image (matched by file name): OUT/eval/gallery/index.html."""
    from distill.gallery import build_gallery

    return str(build_gallery(folder / GALLERY, Path(s.images).resolve(), [masks], labels=[f"{s.method} masks"],
                             gt_json=str(gt_json), title=f"{s.method} masks and the ground truth", overwrite=True))


def run_eval(s: PipelineSettings, folder: Path, results: dict) -> dict:
    """The metrics, each with what it was measured against; the GT-free ones run without --gt_json too."""
    maskrcnn = results["maskrcnn"]
    rows = instance_metrics(maskrcnn["train_results"], maskrcnn["trained_on"],
                            f"its own training pseudo-labels ({Path(maskrcnn['trained_on']).parent.name}/"
                            f"{Path(maskrcnn['trained_on']).name}, class-agnostic; agreement, not accuracy)",
                            "maskrcnn", f"Mask R-CNN round {len(maskrcnn['rounds'])}")
    out: dict = {}
    if s.gt_json:
        from distill.cluster import cluster_masks
        from evaluation.corloc import corloc_row, evaluate_corloc
        from evaluation.metrics import clustering_rows

        masks = results["masks"]["masks"]
        gt_json, against = run_ground_truth(s.gt_json, masks, folder)
        rows += instance_metrics(masks, str(gt_json), against, "masks", f"{s.method} masks")
        corloc = evaluate_corloc(masks, str(gt_json))
        write_json(folder / "corloc.json", corloc.to_json(), indent=1)
        rows.append(corloc_row(corloc, f"{s.method} masks", f"{Path(s.gt_json).name} boxes", "masks"))
        # The same K-means (same features from the cache, same seed) with the GT: clusters matched to classes.
        cluster_gt = cluster_settings(s, masks, folder / "clusters_vs_gt.json", str(gt_json))
        cluster_gt.metrics_json = str(folder / "cluster_metrics.json")
        scores = cluster_masks(cluster_gt)
        rows += clustering_rows(scores, f"{Path(s.gt_json).name} classes of the GT box each mask overlaps most")
        rows += instance_metrics(maskrcnn["train_results"], str(gt_json), against, "maskrcnn",
                                 f"Mask R-CNN round {len(maskrcnn['rounds'])}")
        rows += miou_metrics(s, results, folder, gt_json)
        out["gallery"] = masks_gallery(s, masks, folder, gt_json)
    metrics = rows_to_json(rows)
    write_json(folder / "metrics.json", metrics, indent=1)
    return {"metrics": metrics, **out}
