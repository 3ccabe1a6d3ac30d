"""The batched engine of `gen_masks.py`: a ViT backbone and one discovery method over a data set.

Per batch (images of equal network size, decoded and resized by DataLoader workers): the ViT under
the chosen precision, its features (`distill.methods.backbone_features`) to the method, which returns
scored patch masks per image with its graph work batched on the device. The per-image CPU work
(MaskCut's CRF, the upsampling to the original size, RLE encoding, overlays) runs in a pool of worker
processes (`--post_workers`) while the next batch goes through the network; finished records are
appended to the part file in batch order, so an interrupted run resumes from the last written image.

A caller describes a run with a `GenMasksRequest` (the typed twin of `gen_masks.py`'s flags) and
`gen_masks_settings` checks and resolves it (the arch's patch size, the backbone's features, the precision of
the device, the method's defaults) into a frozen `GenMasksSettings` that `generate_masks` runs. `gen_masks.py`
builds the request from its parsed flags (`gen_masks_from_args`, also `MergeParts` for --merge); the pipeline
builds it directly, and both get the same settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.features import feature_setting
from distill.data import Geometry, ImageEntry, InputPolicy, MaskGenDataset, collate, size_grouped_batches
from distill.cli import ImageSetOptions, OutputOptions
from distill.generate import MaskJob, MergeParts, PartWriter, RunStats, merge, run
from distill.methods import MethodSettings, backbone_features, method_features, pixel_masks, propose, resolve_method
from distill.registry import load_method
from distill.patches import PatchMask
from distill.visualize import overlay_name, save_overlay
from utils.vit import DinoViT, build_vit
from utils.vit_archs import resolve_patch_size
from utils.cli import options_from
from utils.coco_io import make_annotation
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.images import load_rgb
from utils.precision import autocast as precision_autocast
from utils.precision import choose_precision, precision_was_chosen, resolve_precision
from utils.progress import progress
from utils.workers import default_workers, worker_pool

MAX_PENDING_BATCHES = 2  # batches whose post-processing may lag behind the network


@dataclass(frozen=True)
class BackboneSettings:
    """The ViT and its features, resolved (`resolve_backbone`)."""

    arch: str
    patch_size: int  # the arch's own when not given
    weights: str  # 'dino', a checkpoint path, or 'random'
    features: str  # what the patch graphs read: 'raw', 'centred' or 'centred_tokens' ('auto' resolved)
    precision: str  # 'bf16' or 'fp32' ('auto' resolved for the device)
    precision_choice: str = ""  # why (`utils.precision.PrecisionChoice.reason`): recorded, not compared on resume


@dataclass(frozen=True)
class SpeedSettings:
    """How fast, never what: batching and worker processes (not recorded)."""

    batch_size: int = 8
    num_workers: int | None = None  # DataLoader decoding workers (None: min(4, CPUs - 1))
    post_workers: int | None = None  # per-image CPU work processes (None: min(8, CPUs))


@dataclass(frozen=True)
class BackboneRequest:
    """The backbone as asked for (gen_masks.py's "backbone" flags); `resolve_backbone` decides what is left open."""

    arch: str = "vit_small"
    patch_size: int | None = None
    weights: str = "dino"
    features: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class MethodRequest:
    """The method as asked for (gen_masks.py's "method" flags); None takes the method's default on the arch."""

    method: str = "maskdistill"
    heads: int | None = None
    topk: float | None = None
    k_patches: int | None = None
    tau: float | None = None
    num_objects: int | None = None
    foreground: str | None = None
    mask_score: str | None = None
    resize: int | None = None
    fixed_size: int | None = None
    max_size: int = 2048


@dataclass(frozen=True)
class GenMasksRequest:
    """A mask-generation run as asked for: the typed twin of `gen_masks.py`'s flags but --merge."""

    images: ImageSetOptions
    output: OutputOptions
    backbone: BackboneRequest = BackboneRequest()
    method: MethodRequest = MethodRequest()
    speed: SpeedSettings = SpeedSettings()
    device: str = "auto"


@dataclass(frozen=True)
class GenMasksSettings:
    """Everything a `gen_masks.py` run takes, checked and resolved (`gen_masks_settings`)."""

    job: MaskJob
    backbone: BackboneSettings
    method: MethodSettings
    speed: SpeedSettings


PROBE_SIDE = 480  # input side of the precision probe for methods that take images at full resolution


def resolve_backbone(arch: str, patch_size: int | None, weights: str, features: str, precision: str,
                     device: str, input_side: int = 0) -> BackboneSettings:
    """The backbone settings with what was left to the arch or the hardware decided (and checked). On a CPU,
    `--precision auto` times the arch's forward on one `input_side` square image (0: `PROBE_SIDE`)."""
    patch_size = resolve_patch_size(arch, patch_size)
    features = feature_setting(arch, features)
    side = (input_side or PROBE_SIDE) // patch_size * patch_size
    choice = choose_precision(precision, resolve_device(device), partial(_probe_forward, arch, patch_size, side,
                                                                         features),
                              key=f"{arch}/{patch_size} 1x3x{side}x{side}")
    return BackboneSettings(arch, patch_size, weights, features, choice.name, choice.reason)


_PROBES: dict[tuple, tuple[DinoViT, torch.Tensor]] = {}  # one probe model per shape, built on the first forward


def _probe_forward(arch: str, patch_size: int, side: int, features: str) -> None:
    """One forward of the arch (random weights: the time does not depend on them) as the engine runs it."""
    if (arch, patch_size, side) not in _PROBES:
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):  # built outside the timed mode
            torch.manual_seed(0)
            _PROBES.clear()
            _PROBES[arch, patch_size, side] = (DinoViT(arch, patch_size).eval(), torch.randn(1, 3, side, side))
    model, image = _PROBES[arch, patch_size, side]
    backbone_features(model, image, features)


@dataclass
class ImageJob:
    """Everything the post-processing of one image needs (sent to a worker process)."""

    index: int
    image: dict  # the COCO image record
    geometry: Geometry
    proposals: list[PatchMask]
    method: str
    mask_format: str
    working: np.ndarray | None = None  # the resized image, for methods that refine masks on it
    overlay: tuple[Path, Path] | None = None  # (image file, overlay PNG) with --vis_dir


def finish_image(job: ImageJob) -> tuple[str, int]:
    """Pixel masks (the method's `refine`, or a nearest upsampling), their annotations and overlay, best-first
    by score (a stable sort: ties keep the method's order): (the image's record line for the part file, its
    number of masks)."""
    masks = pixel_masks(load_method(job.method), job.working, job.proposals, job.geometry)
    kept = sorted(((p, m) for p, m in zip(job.proposals, masks) if m is not None), key=lambda pm: -pm[0].score)
    annotations = [make_annotation(m, job.image["id"], 1, p.score, job.mask_format) for p, m in kept]
    if job.overlay is not None:
        seeds = [job.geometry.patch_box(*p.seed_patch) if p.seed_patch else None for p, _ in kept]
        save_overlay(load_rgb(job.overlay[0]), [m for _, m in kept], [p.score for p, _ in kept], seeds,
                     job.overlay[1], file_name=job.image["file_name"], source=job.overlay[0])
    return json.dumps({"index": job.index, "image": job.image, "annotations": annotations}), len(annotations)


class PostProcessing:
    """`finish_image` over the jobs of each batch, in worker processes (inline with 0 workers); the
    records are written in submission order. On an error or an interrupt in the main process, the
    batches already handed to the workers are still finished and written before the pool stops."""

    def __init__(self, workers: int, writer: PartWriter) -> None:
        self.workers, self.writer = workers, writer
        self.pool = None
        self.pending: deque = deque()
        self.waited = 0.0

    def __enter__(self) -> "PostProcessing":
        if self.workers:
            self.pool = worker_pool(self.workers)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.write_ready(wait_all=True)  # on an interrupt too: a second one stops at once
        except BaseException:
            if exc_type is None:
                raise
        finally:
            if self.pool is not None:
                self.pool.terminate()
                self.pool.join()

    def submit(self, jobs: list[ImageJob]) -> None:
        if self.pool is None:
            self.pending.append(_Finished([finish_image(job) for job in jobs]))
        else:
            self.pending.append(self.pool.map_async(finish_image, jobs, chunksize=1))

    def write_ready(self, wait_all: bool = False) -> None:
        """Write the finished batches at the head of the queue; wait while too many are pending."""
        while self.pending and (wait_all or self.pending[0].ready() or len(self.pending) > MAX_PENDING_BATCHES):
            start = time.perf_counter()
            results = self.pending.popleft().get()
            self.waited += time.perf_counter() - start
            self.writer.write([line for line, _ in results])
            self.writer.stats.annotations += sum(count for _, count in results)


class _Finished:
    """An already computed result with the `AsyncResult` interface."""

    def __init__(self, value: list) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self) -> list:
        return self.value


class ViTMaskSource:
    """The mask source of `gen_masks.py`: a method on the features of a ViT backbone, for `job` (its device
    and output encoding; under torchrun, the rank's job).

    Built before the job writes anything, so a bad `--weights` stops it with nothing left behind."""

    def __init__(self, job: MaskJob, backbone: BackboneSettings, method: MethodSettings,
                 speed: SpeedSettings) -> None:
        self.backbone, self.speed = backbone, speed
        self.method = load_method(method.name)
        self.params = method.params
        self.policy = InputPolicy(method.resize, method.max_size, method.fixed_size, backbone.patch_size)
        self.mask_format = job.output.mask_format
        self.vis_dir = Path(job.output.vis_dir) if job.output.vis_dir else None
        self.device = resolve_device(job.device)
        if precision_was_chosen(backbone.precision_choice):
            print(f"precision {backbone.precision}: {backbone.precision_choice}", file=sys.stderr)
        self.model = build_vit(backbone.arch, backbone.patch_size, backbone.weights).to(self.device)
        self.dataset: MaskGenDataset | None = None

    def plan(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> list[list[int]]:
        self.dataset = MaskGenDataset(entries, sizes, self.policy, keep_working=self.method.refine is not None)
        return size_grouped_batches(self.dataset, sorted(sizes), self.speed.batch_size)

    def run(self, batches: list[list[int]], writer: PartWriter) -> None:
        device = self.device
        workers = default_workers(self.speed.num_workers, at_most=4, spare=1, at_least=0)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
        autocast = precision_autocast(resolve_precision(self.backbone.precision, device), device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        vis_dir = self.vis_dir
        post_workers = default_workers(self.speed.post_workers, at_most=8)
        threads = torch.get_num_threads()
        if device.type == "cpu" and self.method.refine is not None and post_workers:
            # The CRF workers keep their cores busy: threads of the main process beyond the cores left
            # over would only contend with them (OpenMP threads spin when they cannot run).
            torch.set_num_threads(max(1, threads - post_workers))
        try:
            self._run_batches(loader, batches, writer, post_workers, autocast, sync, vis_dir)
        finally:
            torch.set_num_threads(threads)

    def _run_batches(self, loader: DataLoader, batches: list[list[int]], writer: PartWriter, post_workers: int,
                     autocast, sync, vis_dir: Path | None) -> None:
        dataset, device = self.dataset, self.device
        seconds = writer.stats.seconds
        with PostProcessing(post_workers, writer) as post, \
                progress(total=sum(map(len, batches)), desc=self.method.name, unit="img") as bar:
            for batch in loader:
                for index, reason in batch["failed"]:
                    writer.skip(dataset.entries[index], reason)
                if batch["images"] is not None:
                    t0 = time.perf_counter()
                    images = batch["images"].to(device, non_blocking=True)
                    with torch.inference_mode(), autocast:
                        features = backbone_features(self.model, images, self.backbone.features)
                    sync()
                    t1 = time.perf_counter()
                    with torch.inference_mode():
                        proposals = propose(self.method, features, self.params)
                    t2 = time.perf_counter()
                    jobs = [self._job(index, masks, working, vis_dir)
                            for index, masks, working in zip(batch["indices"], proposals, batch["working"])
                            if index not in writer.done]  # recomputed only because its batch was cut short
                    post.submit(jobs)
                    seconds["model"] += t1 - t0
                    seconds["mask"] += t2 - t1
                post.write_ready()
                bar.update(len(batch["indices"]) + len(batch["failed"]))
        seconds["post"] += post.waited

    def _job(self, index: int, proposals: list[PatchMask], working: np.ndarray | None, vis_dir: Path | None) -> ImageJob:
        entry = self.dataset.entries[index]
        height, width = self.dataset.sizes[index]
        image = {"id": entry.image_id, "file_name": entry.file_name, "height": height, "width": width}
        overlay = (entry.path, vis_dir / overlay_name(entry.file_name)) if vis_dir else None
        return ImageJob(index, image, self.dataset.geometry(index), proposals, self.method.name,
                        self.mask_format, working, overlay)


def recorded_settings(request: GenMasksRequest, backbone: BackboneSettings, method: MethodSettings) -> dict:
    """The run's settings as every part, the output's `info.settings` and its `.config.yaml` record them: the
    image-set, backbone, method and encoding values (the flags of `distill.cli.SETTING_GROUPS`, in gen_masks.py's
    order), with what was resolved in place of what was left open."""
    images = asdict(request.images)
    images["exclude"] = list(request.images.exclude) or None  # as parsed: None when not given
    if images["dataset_root"]:
        images["dataset_root"] = str(Path(images["dataset_root"]).resolve())
    methods = {**asdict(request.method), **method.params, "resize": method.resize, "fixed_size": method.fixed_size}
    resolved = asdict(backbone)
    choice = resolved.pop("precision_choice")  # recorded last, and not compared on resume (RECORDED_ONLY)
    return {**images, **resolved, **methods, "mask_format": request.output.mask_format, "precision_choice": choice}


def gen_masks_settings(request: GenMasksRequest) -> GenMasksSettings:
    """A run's request checked and resolved into its settings (nothing is read or written yet)."""
    if not request.images.dataset or not request.images.dataset_root:
        raise UserError("--dataset and --dataset_root are required (or --merge)")
    asked, given = request.backbone, request.method
    # Resolved before they are recorded: a resume on other hardware must not silently change precision.
    # --features auto: the method's features on the arch's family (DINOv2's LOST reads centred output tokens).
    features = method_features(given.method, asked.arch, asked.features)
    method = resolve_method(given.method, asked.arch, asdict(given), given.resize, given.fixed_size, given.max_size,
                            resolve_patch_size(asked.arch, asked.patch_size))
    # --precision auto on a CPU is measured at the method's input size
    backbone = resolve_backbone(asked.arch, asked.patch_size, asked.weights, features, asked.precision, request.device,
                                method.fixed_size or method.resize)
    job = MaskJob(request.images, request.output, recorded_settings(request, backbone, method), request.device)
    return GenMasksSettings(job, backbone, method, request.speed)


def gen_masks_from_args(args: argparse.Namespace) -> GenMasksSettings | MergeParts:
    """`gen_masks.py`'s parsed flags as a `GenMasksRequest`, checked and resolved by `gen_masks_settings` (`args`
    is left as it is); with --merge, the merge of the output's shard parts, and nothing else is checked."""
    values = vars(args)
    output = options_from(OutputOptions, values)
    if args.merge:
        return MergeParts(output)
    return gen_masks_settings(GenMasksRequest(
        options_from(ImageSetOptions, values), output, options_from(BackboneRequest, values),
        options_from(MethodRequest, values), options_from(SpeedSettings, values), args.device))


def generate_masks(command: GenMasksSettings | MergeParts) -> RunStats | None:
    """`gen_masks.py`: merge shard parts, or run the job (None after a merge)."""
    if isinstance(command, MergeParts):
        merge(command.output)
        return None
    return run(command.job, partial(ViTMaskSource, backbone=command.backbone, method=command.method,
                                    speed=command.speed))
