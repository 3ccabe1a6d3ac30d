"""The batched engine of `gen_masks.py`: a ViT backbone and one discovery method over a data set.

Per batch (images of equal network size, decoded and resized by DataLoader workers): the ViT under
the chosen precision, its features (`distill.methods.backbone_features`) to the method, which returns
scored patch masks per image with its graph work batched on the device. The per-image CPU work
(MaskCut's CRF, the upsampling to the original size, RLE encoding, overlays) runs in a pool of worker
processes (`--post_workers`) while the next batch goes through the network; finished records are
appended to the part file in batch order, so an interrupted run resumes from the last written image.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.data import (Geometry, ImageEntry, InputPolicy, MaskGenDataset, collate, size_grouped_batches,
                          upsample_patch_mask, worker_count)
from distill.cli import settings_from
from distill.generate import PartWriter, RunStats, merge, run
from distill.methods import METHODS, backbone_features, method_params, propose, resolve_method_args
from distill.patches import PatchMask
from distill.visualize import overlay_name, save_overlay
from distill.vit import build_vit, resolve_patch_size
from utils.coco_io import make_annotation
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.images import load_rgb
from utils.precision import autocast as precision_autocast
from utils.precision import precision_name, resolve_precision
from utils.progress import progress

MAX_PENDING_BATCHES = 2  # batches whose post-processing may lag behind the network


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
    """Pixel masks (the method's `refine`, or a nearest upsampling), their annotations and overlay:
    (the image's record line for the part file, its number of masks)."""
    refine = METHODS[job.method].refine
    if refine is not None:
        masks = refine(job.working, job.proposals, job.geometry)
    else:
        masks = [upsample_patch_mask(p.mask, job.geometry) for p in job.proposals]
    kept = [(p, m) for p, m in zip(job.proposals, masks) if m is not None]
    annotations = [make_annotation(m, job.image["id"], 1, p.score, job.mask_format) for p, m in kept]
    if job.overlay is not None:
        seeds = [job.geometry.patch_box(*p.seed_patch) if p.seed_patch else None for p, _ in kept]
        save_overlay(load_rgb(job.overlay[0]), [m for _, m in kept], [p.score for p, _ in kept], seeds,
                     job.overlay[1], file_name=job.image["file_name"], source=job.overlay[0])
    return json.dumps({"index": job.index, "image": job.image, "annotations": annotations}), len(annotations)


def _init_worker() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the pool


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
            # fork shares the loaded modules at no cost; spawn where there is no fork
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = multiprocessing.get_context(method).Pool(self.workers, initializer=_init_worker)
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


def post_worker_count(requested: int | None) -> int:
    if requested is not None:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return min(8, cpus)


class ViTMaskSource:
    """The mask source of `gen_masks.py`: `args.method` on the features of a ViT backbone.

    Built before the job writes anything, so a bad `--weights` stops it with nothing left behind."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.method = METHODS[args.method]
        self.params = method_params(args)
        self.policy = InputPolicy(args.resize, args.max_size, args.fixed_size, args.patch_size)
        self.device = resolve_device(args.device)
        self.model = build_vit(args.arch, args.patch_size, args.weights).to(self.device)
        self.dataset: MaskGenDataset | None = None

    def plan(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> list[list[int]]:
        self.dataset = MaskGenDataset(entries, sizes, self.policy, keep_working=self.method.refine is not None)
        return size_grouped_batches(self.dataset, sorted(sizes), self.args.batch_size)

    def run(self, batches: list[list[int]], writer: PartWriter) -> None:
        args, device = self.args, self.device
        workers = worker_count(args.num_workers)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                            pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
        autocast = precision_autocast(resolve_precision(args.precision, device), device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        vis_dir = Path(args.vis_dir) if args.vis_dir else None
        post_workers = post_worker_count(args.post_workers)
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
        args, dataset, device = self.args, self.dataset, self.device
        seconds = writer.stats.seconds
        with PostProcessing(post_workers, writer) as post, \
                progress(total=sum(map(len, batches)), desc=args.method, unit="img") as bar:
            for batch in loader:
                for index, reason in batch["failed"]:
                    writer.skip(dataset.entries[index], reason)
                if batch["images"] is not None:
                    t0 = time.perf_counter()
                    images = batch["images"].to(device, non_blocking=True)
                    with torch.inference_mode(), autocast:
                        features = backbone_features(self.model, images, args.features)
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
        return ImageJob(index, image, self.dataset.geometry(index), proposals, self.args.method,
                        self.args.mask_format, working, overlay)


def generate_masks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RunStats | None:
    """`gen_masks.py`: merge shard parts, or check the flags and run the job (None after a merge)."""
    if args.merge:
        merge(args)
        return None
    if not args.dataset or not args.dataset_root:
        raise UserError("--dataset and --dataset_root are required (or --merge)")
    # Resolved before they are recorded: a resume on other hardware must not silently change precision.
    args.patch_size = resolve_patch_size(args.arch, args.patch_size)
    args.precision = precision_name(resolve_precision(args.precision, resolve_device(args.device)))
    resolve_method_args(args)
    return run(args, settings_from(parser, args), ViTMaskSource)
