"""The MaskDistill pipeline on a folder of images: every stage in order, as resumable steps (utils/steps.py).

    masks     gen_masks.py (distill.engine.generate_masks)           OUT/masks/masks.json, vis/index.html
    cluster   utils/cluster.py (distill.cluster.cluster_masks)       OUT/cluster/labelled.json
    maskrcnn  train_net.py --rounds (self_training_rounds)           OUT/maskrcnn/round<n>/train_results.json
    semantic  gen_segmentation.py (generate_segmentation)            OUT/semantic/labels/*.png, train.txt
    deeplab   train_plus_crf.py (train_plus_crf)                     OUT/deeplab/round<n>/model_final.pth
    eval      eval_instances.py, eval_corloc.py, clustering ACC/NMI, mIoU (with --gt_json; some without):
              orchestrate/evaluate.py, OUT/eval/metrics.json (and a masks-and-GT gallery)
    report    OUT/report.html and report.json (orchestrate/report.py): each stage's metrics, what each was
              measured against, time, settings and trained models

Each stage's flags are built with that stage's own parser, so its checks and defaults apply unchanged. A
rerun skips finished steps and resumes an unfinished one; a changed setting (a weights file changed in
place included) is refused unless `overwrite`, which reruns from the first step it affects (the ground
truth only affects `eval`). `tiny` uses the stages' tiny CPU configs and random/tiny backbones: the run
checks the plumbing in minutes and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

from distill.registry import load_method, method_names
from orchestrate.evaluate import run_eval
from utils.coco_io import load_coco_dataset, load_json
from utils.errors import UserError
from utils.images import IMAGE_EXTENSIONS
from utils.lock import folder_lock
from utils.steps import Step, StepRecord, run_steps

REPO = Path(__file__).resolve().parents[1]

# The stages' configs: the full recipe, and its tiny CPU twin (--tiny).
MASK_RCNN_CONFIG = {False: "configs/detectron2/base_mask_rcnn.yaml", True: "configs/detectron2/tiny_test.yaml"}
DEEPLAB_CONFIG = {False: "configs/segmentation/deeplab_voc.yml", True: "configs/segmentation/tiny_test.yml"}
# --tiny: what makes every stage finish in seconds on a CPU (the numbers mean nothing).
TINY_GEN_MASKS = ["--weights", "random", "--num_workers", "0", "--post_workers", "0"]
TINY_IMAGE_SIZE = 224  # the images' size, as the method's input policy takes it (`tiny_image_flags`)
TINY_MASK_RCNN = ["solver.max_iter=8", "solver.warmup_iters=4", "solver.steps=[6]", "solver.checkpoint_period=1000",
                  "solver.ims_per_batch=2", "model.box_score_thresh=0.0", "model.detections_per_img=5"]
TINY_DEEPLAB = ["solver.max_iter=6", "solver.checkpoint_period=0", "data.crop_size=48"]
FULL_DEEPLAB = ["model.weights=imagenet"]
TINY_CRF_ITERATIONS = 2  # mean-field iterations of the CRF rounds (MaskDistill's 10 without --tiny)
TINY_NUM_CLASSES = 5  # the CRF's cost grows with the classes


@dataclass
class PipelineSettings:
    """Everything `pipeline.py` takes (its --help explains each)."""

    images: str
    out: str
    method: str = "maskdistill"
    gt_json: str | None = None
    tiny: bool = False
    num_classes: int | None = None  # default 20, TINY_NUM_CLASSES with --tiny
    weights: str | None = None  # gen_masks.py --weights (default: the official DINO; --tiny: random)
    self_training_rounds: int = 2
    score_thresh: float = 0.7
    crf_rounds: int = 1
    label_threshold: float = 0.5
    device: str = "auto"


def image_files(folder: Path) -> list[Path]:
    """The images gen_masks.py's folder data set reads: every image file under `folder`, recursively."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_digest(folder: Path) -> str:
    """A digest of the images of a folder (relative names, sizes, modification times): a changed set reruns."""
    sha = hashlib.sha256()
    for path in image_files(folder):
        stat = path.stat()
        sha.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return sha.hexdigest()


def check_settings(settings: PipelineSettings) -> None:
    """Bad input stops the pipeline before any work or file."""
    images = Path(settings.images)
    if not images.is_dir():
        raise UserError(f"--images {settings.images}: not a folder")
    if not image_files(images):
        raise UserError(f"--images {settings.images}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if settings.method not in method_names():
        raise UserError(f"--method {settings.method!r}: choose one of {', '.join(method_names())}")
    if settings.gt_json is not None:
        load_coco_dataset(settings.gt_json)  # a clear error for a missing or broken file
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {settings.out}: exists and is not a folder")


# ----------------------------------------------------------------------------- the stages


def tiny_image_flags(method: str) -> list[str]:
    """--tiny's image size for gen_masks.py: a fixed square for a method whose input is one (MaskCut), else the
    shorter side."""
    return ["--fixed_size" if load_method(method).fixed_size else "--resize", str(TINY_IMAGE_SIZE)]


def gen_masks_argv(s: PipelineSettings) -> list[str]:
    """gen_masks.py's flags for the images (the output paths are added per run)."""
    argv = ["--dataset", "folder", "--dataset_root", str(Path(s.images).resolve()), "--method", s.method,
            "--device", s.device]
    if s.tiny:
        argv += TINY_GEN_MASKS + tiny_image_flags(s.method)
    if s.weights is not None:
        argv += ["--weights", s.weights]  # after the tiny flags: the last one wins
    return argv


def run_masks(s: PipelineSettings, folder: Path, results: dict) -> dict:
    import gen_masks
    from distill.engine import gen_masks_from_args, generate_masks

    masks = folder / "masks.json"
    parser = gen_masks.build_parser()
    args = parser.parse_args(gen_masks_argv(s) + ["--pred_json_path", str(masks), "--vis_dir", str(folder / "vis"),
                                                  "--resume"])
    stats = generate_masks(gen_masks_from_args(parser, args))
    dataset = load_json(masks)
    return {"masks": str(masks), "gallery": str(folder / "vis" / "index.html"),
            "images": len(dataset["images"]), "annotations": len(dataset["annotations"]),
            "skipped_images": len(getattr(stats, "skipped", []) or [])}


def cluster_settings(s: PipelineSettings, masks: str, output_file: Path, gt_file: str | None = None):
    """The clustering of `masks`. The crop features are cached next to the masks (OUT/masks/), keyed by
    content: a rerun of the clustering with other settings, and the evaluation's, reuse them."""
    from distill.cluster import ClusterSettings

    return ClusterSettings(input_file=masks, image_root=str(Path(s.images).resolve()),
                           output_file=str(output_file), num_classes=s.num_classes, gt_file=gt_file,
                           overwrite=True, device=s.device,
                           num_workers=0 if s.tiny else 2)


def run_cluster(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from distill.cluster import cluster_masks

    # Without the ground truth: the training labels are K-means clusters, never GT classes.
    settings = cluster_settings(s, results["masks"]["masks"], folder / "labelled.json")
    metrics = cluster_masks(settings)
    return {"labelled": settings.output_file, "num_clusters": metrics["num_clusters"],
            "cluster_sizes": metrics["cluster_sizes"]}


def mask_rcnn_argv(s: PipelineSettings, labelled: str, folder: Path) -> list[str]:
    argv = ["--config", str(REPO / MASK_RCNN_CONFIG[s.tiny]), "--train_json", labelled,
            "--train_root", str(Path(s.images).resolve()), "--output_dir", str(folder),
            "--rounds", str(s.self_training_rounds), "--score_thresh", str(s.score_thresh), "--device", s.device]
    if s.tiny:
        argv += ["--set", *TINY_MASK_RCNN]
    return argv


def run_mask_rcnn(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from detectron2_train import train_net
    from detectron2_train.self_training import self_training_rounds
    from utils.distributed import distributed_session

    args = train_net.parse_args(mask_rcnn_argv(s, results["cluster"]["labelled"], folder))
    cfg = train_net.config_from_args(args)
    rounds = train_net.round_settings(args)
    with distributed_session(args.device) as info:
        done = self_training_rounds(cfg, info, rounds, evaluate=False, overwrite=True)
    last = done[-1]
    return {"rounds": [{"round": r.number, **r.result} for r in done], "train_results": last.result["train_results"],
            "checkpoint": last.result["checkpoint"],
            # what the last round trained on: the clusters (round 1) or the previous round's pseudo-labels
            "trained_on": str(last.directory / "pseudo_labels.json") if last.number > 1 else results["cluster"]["labelled"]}


def run_semantic(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from segmentation.painting import generate_segmentation

    stats = generate_segmentation(results["maskrcnn"]["train_results"], results["cluster"]["labelled"],
                                  folder / "labels", folder / "train.txt", s.label_threshold,
                                  class_ids="contiguous", overwrite=True)
    classes = len(load_json(stats["class_map"])) if "class_map" in stats else s.num_classes
    return {**stats, "label_dir": str(folder / "labels"), "num_classes": classes + 1}


def deeplab_argv(s: PipelineSettings, semantic: dict, folder: Path) -> list[str]:
    image_dir = Path(s.images).resolve() / semantic.get("image_subdir", "")
    overrides = [f"data.image_dir={image_dir}", f"data.label_dir={semantic['label_dir']}",
                 f"data.train_list={semantic['list']}", f"data.num_classes={semantic['num_classes']}",
                 "data.val_list=null", "data.val_label_dir=null"]
    overrides += TINY_DEEPLAB if s.tiny else FULL_DEEPLAB
    return ["--config", str(REPO / DEEPLAB_CONFIG[s.tiny]), "--output_dir", str(folder), "--device", s.device,
            "--rounds", str(s.crf_rounds), "--set", *overrides]


def crf_params(s: PipelineSettings):
    from utils.crf import CRFParams

    return CRFParams(iterations=TINY_CRF_ITERATIONS) if s.tiny else CRFParams()


def run_deeplab(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from segmentation import train_plus_crf as script
    from segmentation.engine import SCHEMA
    from segmentation.rounds import train_plus_crf
    from utils.config import run_config_from_args
    from utils.distributed import distributed_session

    args = script.parse_args(deeplab_argv(s, results["semantic"], folder))
    config = run_config_from_args(args, SCHEMA)
    with distributed_session(config["device"]) as dist:
        result = train_plus_crf(config, dist, args.rounds, None, crf_params(s), overwrite=True)
    return {**result, "config": config}


# ----------------------------------------------------------------------------- the chain


def build_steps(s: PipelineSettings) -> list[Step]:
    images = {"images": str(Path(s.images).resolve()), "images_digest": folder_digest(Path(s.images))}
    common = {"tiny": s.tiny, "device": s.device}
    return [
        # "weights" by itself, so that a checkpoint file counts by its content (utils/fingerprint.py)
        Step("masks", {**images, **common, "gen_masks": gen_masks_argv(s), "weights": s.weights},
             lambda f, r: run_masks(s, f, r)),
        Step("cluster", {**common, "num_classes": s.num_classes}, lambda f, r: run_cluster(s, f, r),
             inputs=("masks",)),
        Step("maskrcnn", {**common, "rounds": s.self_training_rounds, "score_thresh": s.score_thresh,
                          "config": MASK_RCNN_CONFIG[s.tiny], "overrides": TINY_MASK_RCNN if s.tiny else []},
             lambda f, r: run_mask_rcnn(s, f, r), inputs=("cluster",)),
        Step("semantic", {"label_threshold": s.label_threshold}, lambda f, r: run_semantic(s, f, r),
             inputs=("cluster", "maskrcnn")),
        Step("deeplab", {**common, "crf_rounds": s.crf_rounds, "config": DEEPLAB_CONFIG[s.tiny],
                         "overrides": TINY_DEEPLAB if s.tiny else FULL_DEEPLAB,
                         "crf_iterations": TINY_CRF_ITERATIONS if s.tiny else None},
             lambda f, r: run_deeplab(s, f, r), inputs=("semantic",)),
        Step("eval", {**common, "gt_json": s.gt_json}, lambda f, r: run_eval(s, f, r),
             inputs=("masks", "cluster", "maskrcnn", "semantic", "deeplab")),
    ]


def run_pipeline(s: PipelineSettings, overwrite: bool = False) -> list[StepRecord]:
    """Run (or resume) every stage under `s.out`, then write `s.out/report.html` and `report.json`. Returns the
    step records.

    A stage recorded with other settings is refused before any stage runs, unless `overwrite` (pipeline.py's
    --overwrite): then it reruns from an empty folder, and so do the stages after it that read it."""
    from orchestrate.report import write_pipeline_report

    check_settings(s)
    with folder_lock(s.out, "--out"):  # a second pipeline on the same --out is refused
        records = run_steps(s.out, build_steps(s), overwrite=overwrite, flag="--overwrite")
        report = write_pipeline_report(s, records)
    print(f"report: {report}")
    return records


def settings_from_args(args: argparse.Namespace) -> PipelineSettings:
    settings = PipelineSettings(**{k: v for k, v in vars(args).items() if k in PipelineSettings.__dataclass_fields__})
    if settings.num_classes is None:
        settings.num_classes = TINY_NUM_CLASSES if settings.tiny else 20
    return settings


