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

Each stage is called through its library with typed settings (`distill.engine.GenMasksRequest`,
`detectron2_train.settings.TrainRequest`/`RoundsRequest`, `segmentation.settings.run_settings`), the same
builders its command uses, so its checks and defaults apply unchanged. Everything that can refuse the run is
checked before the first stage (`check_settings`). A rerun skips finished steps and resumes an unfinished one;
a changed setting (a weights or GT file changed in place included) is refused unless `overwrite`, which reruns
from the first step it affects (the ground truth gives the masks their image ids, by file name, and is scored
in `eval`). A step records the paths inside OUT as `$OUT/...`, so a copied or moved OUT uses its own files.
`tiny` uses the stages' tiny CPU configs and random/tiny backbones: the run checks the plumbing in minutes
and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from distill.registry import load_method, method_names
from orchestrate.evaluate import run_eval
from orchestrate.settings import (BACKBONES, DEFAULT_ARCH, PipelineSettings, backbone_for, cluster_settings,
                                  is_weights_file)
from utils.coco_io import check_writable_folder, find_by_file_name, load_coco_dataset, load_json
from utils.errors import UserError
from utils.images import IMAGE_EXTENSIONS, ImageReadError, list_images, read_size
from utils.lock import folder_lock
from utils.steps import MARKER, Step, StepRecord, run_steps
from utils.vit_archs import ARCHS

REPO = Path(__file__).resolve().parents[1]

# The stages' configs per backbone: the full recipe, and its tiny CPU twin (--tiny).
MASK_RCNN_CONFIGS = {
    "resnet": {False: "configs/detectron2/base_mask_rcnn.yaml", True: "configs/detectron2/tiny_test.yaml"},
    "vit": {False: "configs/detectron2/vit_dinov2_s14_cpu.yaml", True: "configs/detectron2/tiny_vit_dinov2_s14_cpu.yaml"}}
DEEPLAB_CONFIGS = {
    "resnet": {False: "configs/segmentation/deeplab_voc.yml", True: "configs/segmentation/tiny_test.yml"},
    "vit": {False: "configs/segmentation/deeplab_vit_dinov2_s14_cpu.yml",
            True: "configs/segmentation/tiny_deeplab_vit_dinov2_s14_cpu.yml"}}
VIT_CACHE = "vit_cache"  # OUT/vit_cache: the detector's token cache, keyed by checkpoint and input (all rounds)
# --tiny: what makes every stage finish in seconds on a CPU (the numbers mean nothing).
TINY_GEN_MASKS = ["--weights", "random", "--num_workers", "0", "--post_workers", "0"]
TINY_IMAGE_SIZE = 224  # the images' size, as the method's input policy takes it (`tiny_image_flags`)
TINY_MASK_RCNN = ["solver.max_iter=8", "solver.warmup_iters=4", "solver.steps=[6]", "solver.checkpoint_period=1000",
                  "solver.ims_per_batch=2", "model.box_score_thresh=0.0", "model.detections_per_img=5"]
TINY_DEEPLAB = ["solver.max_iter=6", "solver.checkpoint_period=0", "data.crop_size=48"]
FULL_DEEPLAB = ["model.weights=imagenet"]
TINY_CRF_ITERATIONS = 2  # mean-field iterations of the CRF rounds (MaskDistill's 10 without --tiny)
TINY_NUM_CLASSES = 5  # the CRF's cost grows with the classes
# Images longer than this many times their width (or wider than tall) are left out: resized to Mask R-CNN's
# longest side (1333, tiny 96) their shorter side would shrink to a few pixels, or none (a RuntimeError in training).
MAX_ASPECT_RATIO = 20


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


# ----------------------------------------------------------------------------- checks before any stage


@dataclass(frozen=True)
class GroundTruthMatch:
    """The images of the folder found in --gt_json by file name (`utils.coco_io.find_by_file_name`)."""

    matched: int
    unmatched: tuple[str, ...]  # folder images (relative paths) the GT does not have


def match_ground_truth(images: Path, files: list[str], gt_json: str) -> GroundTruthMatch:
    """Which of the folder's images (`files`, relative to `images`) --gt_json has, by file name (the same relative
    path, else the same base name when one GT image has it): how gen_masks.py takes its image ids from it.
    Prints "N of M images matched by file name" and names the others; none matched is an error."""
    found = find_by_file_name(files, load_coco_dataset(gt_json)["images"], f"--gt_json {gt_json}",
                              "; keep one of them out of --images")
    unmatched = tuple(f for f, img in zip(files, found) if img is None)
    matched = len(files) - len(unmatched)
    print(f"--gt_json {gt_json}: {matched} of {len(files)} images matched by file name")
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f", ... ({len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        print(f"warning: not in --gt_json, left out of the run: {shown}", file=sys.stderr)
    if not matched:
        raise UserError(f"--gt_json {gt_json}: none of the {len(files)} images of --images {images} is in it (matched "
                        "by file name: the same path relative to --images, else the same base name); pass the "
                        "ground truth of these images, or leave --gt_json out")
    return GroundTruthMatch(matched, unmatched)


def check_weights(weights: str | None) -> None:
    """A checkpoint path exists and starts like a `torch.save` file (a zip archive or a pickle); the file is
    read in full by the masks stage."""
    if not is_weights_file(weights):
        return
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights}: no such file; use 'dino', 'random' or a checkpoint path")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserError(f"--weights {weights}: cannot be read ({exc.strerror or exc})") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"--weights {weights}: not a PyTorch checkpoint (torch.save file)")


def check_method_of_out(s: PipelineSettings) -> None:
    """Another --method's results in --out are not replaced silently: refused unless --overwrite."""
    marker = Path(s.out) / "masks" / MARKER
    if s.overwrite or not marker.is_file():
        return
    try:
        argv = load_json(marker)["fingerprint"]["settings"]["gen_masks"]
        earlier = argv[argv.index("--method") + 1]
    except (UserError, KeyError, TypeError, ValueError, IndexError):
        return  # not a pipeline's record: the steps decide
    if earlier != s.method:
        raise UserError(f"--out {s.out} holds the results of --method {earlier}; --method {s.method} would replace "
                        "them: pass another --out to keep both, or --overwrite to replace them")


def too_elongated(images: Path, files: list[str]) -> list[str]:
    """The images (relative paths) whose sides differ more than `MAX_ASPECT_RATIO` times (header reads only;
    an unreadable image is left to the masks stage, which skips and lists it)."""
    found = []
    for name in files:
        try:
            height, width = read_size(images / name)
        except ImageReadError:
            continue
        if max(height, width) > MAX_ASPECT_RATIO * max(min(height, width), 1):
            print(f"warning: skipping {name}: {width}x{height} (w x h) is more than {MAX_ASPECT_RATIO} times longer "
                  "than wide, too thin for the detectors", file=sys.stderr)
            found.append(name)
    return found


def check_settings(settings: PipelineSettings) -> PipelineSettings:
    """Bad input stops the pipeline before any work or file: the images, the GT against them, --num_classes
    against their number, the output folder, the weights. Returns the settings with the images left out
    (`exclude`: too elongated for the detectors)."""
    images = Path(settings.images)
    if not images.is_dir():
        raise UserError(f"--images {settings.images}: not a folder")
    files = list_images(images)
    if not files:
        raise UserError(f"--images {settings.images}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    excluded = too_elongated(images, files)
    files = [f for f in files if f not in excluded]
    if not files:
        raise UserError(f"--images {settings.images}: every image is more than {MAX_ASPECT_RATIO} times longer "
                        "than wide")
    if settings.method not in method_names():
        raise UserError(f"--method {settings.method!r}: choose one of {', '.join(method_names())}")
    for flag, value, choices in (("--arch", settings.arch, ARCHS), ("--backbone", settings.backbone, BACKBONES)):
        if value not in choices:
            raise UserError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {settings.out}: exists and is not a folder")
    check_writable_folder(out, f"--out {settings.out}")
    check_weights(settings.weights)
    count = len(files)
    if settings.gt_json is not None:
        count = match_ground_truth(images, files, settings.gt_json).matched
    if settings.num_classes is not None and settings.num_classes > count:
        raise UserError(f"--num_classes {settings.num_classes} is more than the {count} images the run takes: "
                        f"K-means needs a mask per cluster; pass --num_classes {count} or fewer")
    check_method_of_out(settings)
    return replace(settings, exclude=tuple(excluded))


# ----------------------------------------------------------------------------- paths in the step records


OUT_PREFIX = "$OUT/"  # how a step's result names a path inside --out, so that a copied or moved --out uses its own


def portable(value: Any, root: Path) -> Any:
    """`value` (a step's result) with every path inside `root` written as `$OUT/<path relative to root>`: the
    strings that name an existing file or folder there (not a word or a sentence that happens to contain a '/')."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and "/" in value and not value.startswith(OUT_PREFIX) and os.path.exists(value):
        relative = os.path.relpath(os.path.abspath(value), os.path.abspath(root))
        if relative != "." and not relative.startswith(".."):
            return OUT_PREFIX + Path(relative).as_posix()
    return value


def resolved(value: Any, root: Path) -> Any:
    """The inverse of `portable`: `$OUT/<path>` back to a path under `root` (the --out of this run)."""
    if isinstance(value, dict):
        return {k: resolved(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v, root) for v in value]
    if isinstance(value, str) and value.startswith(OUT_PREFIX):
        return str(root / value[len(OUT_PREFIX):])
    return value


# ----------------------------------------------------------------------------- the stages


def tiny_image_flags(method: str) -> list[str]:
    """--tiny's image size for gen_masks.py: a fixed square for a method whose input is one (MaskCut), else the
    shorter side."""
    return ["--fixed_size" if load_method(method).fixed_size else "--resize", str(TINY_IMAGE_SIZE)]


def gen_masks_argv(s: PipelineSettings) -> list[str]:
    """The gen_masks.py flags equivalent to `gen_masks_request` (less the output paths): the masks step's record."""
    argv = ["--dataset", "folder", "--dataset_root", str(Path(s.images).resolve()), "--method", s.method,
            "--device", s.device]
    if s.arch != DEFAULT_ARCH:  # only when set: the records of earlier runs stay the same
        argv += ["--arch", s.arch]
    if s.tiny:
        argv += TINY_GEN_MASKS + tiny_image_flags(s.method)
    if s.weights is not None:
        argv += ["--weights", s.weights]  # after the tiny flags: the last one wins
    if s.gt_json is not None:
        argv += ["--gt_json", str(Path(s.gt_json).resolve()), "--skip_images_not_in_gt"]
    for name in s.exclude:
        argv += ["--exclude", glob.escape(name)]
    return argv


def flag_values(argv: Sequence[str]) -> dict[str, str]:
    """`["--resize", "224", ...]` -> `{"resize": "224", ...}`: the flag pairs of the tiny presets above."""
    return {flag[2:]: value for flag, value in zip(argv[::2], argv[1::2])}


def masks_weights(s: PipelineSettings) -> str:
    """The checkpoint of the masks stage (and, with backbone "vit", of every stage): --weights, else 'random'
    with --tiny, else the official one ('dino')."""
    if s.weights is not None:
        return s.weights
    return flag_values(TINY_GEN_MASKS)["weights"] if s.tiny else "dino"


def vit_overrides(s: PipelineSettings, cache_dir: str | None = None) -> list[str]:
    """With backbone "vit": the config overrides that put a stage on the masks stage's checkpoint (`model.vit`),
    with the detector's token cache in `cache_dir`. The tiny twins keep the tiny ResNet, so --tiny names the ViT
    here too. None with the ResNet backbone."""
    if s.backbone != "vit":
        return []
    overrides = ["model.backbone=vit"] if s.tiny else []
    overrides += [f"model.vit.arch={s.arch}", f"model.vit.weights={masks_weights(s)}"]
    return overrides + ([f"model.vit.cache_dir={cache_dir}"] if cache_dir is not None else [])


def mask_rcnn_overrides(s: PipelineSettings, out: str) -> list[str]:
    """The maskrcnn stage's config overrides: the tiny preset, and the ViT's (its cache in `out`/vit_cache). The
    ViT recipes are class-agnostic for train_net.py on plain pseudo-masks; here the detector learns the clusters,
    so that the semantic stage paints them and DeepLab learns them (the ResNet recipes are class-aware already)."""
    vit = vit_overrides(s, f"{out}/{VIT_CACHE}")
    return (TINY_MASK_RCNN if s.tiny else []) + vit + (["data.class_agnostic=false"] if vit else [])


def gen_masks_request(s: PipelineSettings, folder: Path):
    """The masks stage as a `distill.engine.GenMasksRequest`: the folder's images with ids from --gt_json by file
    name (images it lacks left out), resumable, with a gallery in `folder`/vis."""
    from distill.cli import ImageSetOptions, OutputOptions
    from distill.engine import BackboneRequest, GenMasksRequest, MethodRequest, SpeedSettings

    image_ids = "auto" if s.gt_json is None else "from:" + str(Path(s.gt_json).resolve())
    images = ImageSetOptions("folder", str(Path(s.images).resolve()), image_ids=image_ids,
                             skip_images_not_in_gt=s.gt_json is not None,
                             exclude=tuple(glob.escape(name) for name in s.exclude))
    output = OutputOptions(str(folder / "masks.json"), resume=True, vis_dir=str(folder / "vis"))
    tiny = flag_values(TINY_GEN_MASKS) if s.tiny else {}
    weights = masks_weights(s)
    size = {k: int(v) for k, v in flag_values(tiny_image_flags(s.method)).items()} if s.tiny else {}
    speed = SpeedSettings(**{k: int(tiny[k]) for k in ("num_workers", "post_workers") if k in tiny})
    return GenMasksRequest(images, output, BackboneRequest(arch=s.arch, weights=weights), MethodRequest(s.method, **size), speed,
                           s.device)


def run_masks(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from distill.engine import gen_masks_settings, generate_masks
    from distill.visualize import write_gallery

    masks = folder / "masks.json"
    settings = gen_masks_settings(gen_masks_request(s, folder))
    recorded = load_json(masks).get("info", {}).get("settings") if masks.is_file() else None
    if recorded is not None and recorded == json.loads(json.dumps(settings.job.settings)):
        # A kill after the masks were written, before the step was marked done: they are this run's.
        write_gallery(folder / "vis", settings.job.settings)
    else:
        generate_masks(replace(settings, job=replace(settings.job, output=replace(
            settings.job.output, overwrite=recorded is not None))))
    dataset = load_json(masks)
    skipped = dataset.get("skipped_images") or []
    if skipped:
        print(f"warning: {len(skipped)} image(s) could not be read and were left out: "
              + ", ".join(str(item.get("file_name")) for item in skipped[:5]), file=sys.stderr)
    return {"masks": str(masks), "gallery": str(folder / "vis" / "index.html"),
            "images": len(dataset["images"]), "annotations": len(dataset["annotations"]),
            "skipped_images": len(skipped)}


def run_cluster(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from distill.cluster import cluster_masks

    found = results["masks"]["annotations"]
    if found < s.num_classes:
        raise UserError(f"--num_classes {s.num_classes}: the masks stage found only {found} masks to cluster; "
                        f"pass --num_classes {found} or fewer")
    # Without the ground truth: the training labels are K-means clusters, never GT classes.
    settings = cluster_settings(s, results["masks"]["masks"], folder / "labelled.json")
    metrics = cluster_masks(settings)
    return {"labelled": settings.output_file, "num_clusters": metrics["num_clusters"],
            "cluster_sizes": metrics["cluster_sizes"]}


def mask_rcnn_requests(s: PipelineSettings, labelled: str, folder: Path):
    """The maskrcnn stage as typed settings: (`detectron2_train.settings.TrainRequest`, `RoundsRequest`)."""
    from detectron2_train.settings import RoundsRequest, TrainRequest

    train = TrainRequest(str(REPO / MASK_RCNN_CONFIGS[s.backbone][s.tiny]),
                         tuple(mask_rcnn_overrides(s, str(Path(s.out).resolve()))),
                         output_dir=str(folder), train_json=labelled, train_root=str(Path(s.images).resolve()))
    return train, RoundsRequest(s.self_training_rounds, score_thresh=(s.score_thresh,))


def run_mask_rcnn(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from detectron2_train.self_training import self_training_rounds
    from detectron2_train.settings import round_settings, train_config
    from utils.distributed import distributed_session

    train, rounds_request = mask_rcnn_requests(s, results["cluster"]["labelled"], folder)
    cfg = train_config(train)
    rounds = round_settings(train, rounds_request)
    with distributed_session(s.device) as info:
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


def deeplab_overrides(s: PipelineSettings, semantic: dict) -> list[str]:
    """The deeplab stage's config overrides: the semantic stage's labels, and the tiny or full preset."""
    image_dir = Path(s.images).resolve() / semantic.get("image_subdir", "")
    overrides = [f"data.image_dir={image_dir}", f"data.label_dir={semantic['label_dir']}",
                 f"data.train_list={semantic['list']}", f"data.num_classes={semantic['num_classes']}",
                 "data.val_list=null", "data.val_label_dir=null"]
    return overrides + deeplab_preset(s)


def deeplab_preset(s: PipelineSettings) -> list[str]:
    """The tiny or full preset of the deeplab stage, on the ViT when asked (no ImageNet ResNet then)."""
    if s.backbone == "vit":
        return (TINY_DEEPLAB if s.tiny else []) + vit_overrides(s)
    return TINY_DEEPLAB if s.tiny else FULL_DEEPLAB


def deeplab_config(s: PipelineSettings, semantic: dict, folder: Path) -> dict:
    from segmentation.settings import run_settings

    return run_settings(str(REPO / DEEPLAB_CONFIGS[s.backbone][s.tiny]), deeplab_overrides(s, semantic), str(folder), s.device)


def crf_params(s: PipelineSettings):
    from utils.crf import CRFParams

    return CRFParams(iterations=TINY_CRF_ITERATIONS) if s.tiny else CRFParams()


def run_deeplab(s: PipelineSettings, folder: Path, results: dict) -> dict:
    from segmentation.rounds import train_plus_crf
    from utils.distributed import distributed_session

    config = deeplab_config(s, results["semantic"], folder)
    with distributed_session(config["device"]) as dist:
        result = train_plus_crf(config, dist, s.crf_rounds, None, crf_params(s), overwrite=True)
    return {**result, "config": config}


# ----------------------------------------------------------------------------- the chain


def in_out(run: Callable[[PipelineSettings, Path, dict], dict], s: PipelineSettings) -> Callable[[Path, dict], dict]:
    """A stage as a step's `run`: it gets the earlier results with their paths under this --out, and its result is
    recorded with `$OUT/` paths (`portable`)."""
    root = Path(s.out)
    return lambda folder, results: portable(run(s, folder, resolved(results, root)), root)


def build_steps(s: PipelineSettings) -> list[Step]:
    images = {"images": str(Path(s.images).resolve()), "images_digest": folder_digest(Path(s.images))}
    common = {"tiny": s.tiny, "device": s.device}
    # The ViT route's checkpoint counts by its content in the trained stages too (the ResNet route records no
    # new key, so that its earlier runs resume).
    vit = {"weights": s.weights} if s.backbone == "vit" else {}
    return [
        # The GT (image ids by file name) and a weights file count by their content (utils/fingerprint.py).
        Step("masks", {**images, **common, "gen_masks": gen_masks_argv(s), "gt_json": s.gt_json,
                       "weights": s.weights}, in_out(run_masks, s)),
        Step("cluster", {**common, "num_classes": s.num_classes}, in_out(run_cluster, s), inputs=("masks",)),
        Step("maskrcnn", {**common, "rounds": s.self_training_rounds, "score_thresh": s.score_thresh,
                          "config": MASK_RCNN_CONFIGS[s.backbone][s.tiny],
                          "overrides": mask_rcnn_overrides(s, OUT_PREFIX.rstrip("/")), **vit},
             in_out(run_mask_rcnn, s), inputs=("cluster",)),
        Step("semantic", {"label_threshold": s.label_threshold}, in_out(run_semantic, s),
             inputs=("cluster", "maskrcnn")),
        Step("deeplab", {**common, "crf_rounds": s.crf_rounds, "config": DEEPLAB_CONFIGS[s.backbone][s.tiny],
                         "overrides": deeplab_preset(s), **vit,
                         "crf_iterations": TINY_CRF_ITERATIONS if s.tiny else None},
             in_out(run_deeplab, s), inputs=("semantic",)),
        Step("eval", {**common, "gt_json": s.gt_json}, in_out(run_eval, s),
             inputs=("masks", "cluster", "maskrcnn", "semantic", "deeplab")),
    ]


def run_pipeline(s: PipelineSettings) -> list[StepRecord]:
    """Run (or resume) every stage under `s.out`, then write `s.out/report.html` and `report.json`. Returns the
    step records.

    A stage recorded with other settings is refused before any stage runs, unless `s.overwrite` (pipeline.py's
    --overwrite): then it reruns from an empty folder, and so do the stages after it that read it."""
    from orchestrate.report import write_pipeline_report

    s = check_settings(s)
    with folder_lock(s.out, "--out"):  # a second pipeline on the same --out is refused
        records = run_steps(s.out, build_steps(s), overwrite=s.overwrite, flag="--overwrite")
        # the report links the files themselves: the records' `$OUT/` paths resolved under this --out
        report = write_pipeline_report(s, [replace(r, result=resolved(r.result, Path(s.out))) for r in records])
    print(f"report: {report}")
    return records


def settings_from_args(args: argparse.Namespace) -> PipelineSettings:
    settings = PipelineSettings(**{k: v for k, v in vars(args).items() if k in PipelineSettings.__dataclass_fields__})
    settings.backbone = backbone_for(settings.backbone, settings.weights)
    if settings.num_classes is None:
        settings.num_classes = TINY_NUM_CLASSES if settings.tiny else 20
    return settings


