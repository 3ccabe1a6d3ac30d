"""Pseudo-masks from pairwise affinity (GGN): the PA map of each image, from its ground truth (the
oracle) or from a trained PA predictor, grouped into its top-k class-agnostic masks
(distill/grouping.py) and written as COCO annotations with scores.

`PAMaskSource` has the shape of a mask source of the generation engine: `plan` lays out the
batches over the data set (one image each), `run` processes them and hands one record per image
(`{"index", "image", "annotations"}`) to a writer with `write(lines)` and `skip(entry, reason)`.
The grouping, the CPU-heavy part, runs in worker processes while the main process reads images
and runs the predictor; records come back in data-set order.

`generate_pa_masks` is the job of `gen_pa_masks.py`. Until the engine of distill/generate.py
takes several annotations per image record and a command's own settings, it writes the output of
a single run itself (the COCO dataset, its results list and the config, as gen_masks.py does),
without shards or resume.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from detectron2_train.affinity import AFFINITY_INPUT_DEFAULTS, load_affinity_model, predict_affinity
from distill.data import ImageEntry, worker_count
from distill.generate import CATEGORIES, dataset_entries, results_path
from distill.grouping import GroupingOptions, image_record
from utils.coco_io import (annotations_by_image, check_can_write, check_writable, image_index, load_coco_dataset,
                           write_json)
from utils.config import save_config
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.images import ImageReadError, load_rgb, read_size

ORACLE = "oracle"


def _init_worker() -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- the source


class PAMaskSource:
    """Top-k masks per image from the oracle (`affinity='oracle'`, with `gt_json`) or a PA checkpoint."""

    def __init__(self, affinity: str, options: GroupingOptions, mask_format: str = "rle", gt_json: str | None = None,
                 device: str = "auto", workers: int | None = None):
        options.check()
        self.options, self.mask_format = options, mask_format
        self.workers = worker_count(workers)
        self.model = None
        if affinity == ORACLE:
            if not gt_json:
                raise UserError("--affinity oracle needs --gt_json (the ground truth the affinity is computed from)")
            gt = load_coco_dataset(gt_json)
            self.gt_json, self.gt_images, self.gt_annotations = gt_json, image_index(gt), annotations_by_image(gt["annotations"])
        else:
            self.device = resolve_device(device)
            self.model, config = load_affinity_model(affinity, self.device)
            sizes = {**AFFINITY_INPUT_DEFAULTS, **config.get("input", {})}
            self.min_size, self.max_size = int(sizes["min_size_test"]), int(sizes["max_size_test"])

    def plan(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> list[list[int]]:
        """One image per batch, in data-set order; the oracle first checks that the GT knows every image."""
        self.entries = {e.index: e for e in entries}
        self.sizes = sizes
        if self.model is None:
            for entry in entries:
                gt_image = self.gt_images.get(entry.image_id)
                if gt_image is None:
                    raise UserError(f"{entry.file_name}: image id {entry.image_id} is not in --gt_json {self.gt_json}")
                if entry.index in sizes and sizes[entry.index] != (gt_image["height"], gt_image["width"]):
                    raise UserError(f"{entry.file_name} is {sizes[entry.index][0]}x{sizes[entry.index][1]} (height x "
                                    f"width) but --gt_json says {gt_image['height']}x{gt_image['width']}")
        return [[index] for index in sorted(sizes)]

    def _jobs(self, batches: list[list[int]]) -> Iterator[dict]:
        options = asdict(self.options)
        for batch in batches:
            for index in batch:
                entry = self.entries[index]
                height, width = self.sizes[index]
                image = {"id": entry.image_id, "file_name": entry.file_name, "height": height, "width": width}
                job = {"index": index, "image": image, "options": options, "mask_format": self.mask_format}
                if self.model is None:
                    job["annotations"] = self.gt_annotations.get(entry.image_id, [])
                else:
                    try:
                        pixels = load_rgb(entry.path)
                    except ImageReadError as exc:
                        yield {"index": index, "error": str(exc)}
                        continue
                    job["pa"] = predict_affinity(self.model, TF.pil_to_tensor(pixels).float().div_(255),
                                                 self.min_size, self.max_size)
                yield job

    def run(self, batches: list[list[int]], writer) -> None:  # noqa: ANN001 (the engine's writer)
        """Group every image of `batches`; records are written in order, at most 2 x workers pending."""
        total = sum(map(len, batches))
        with tqdm(total=total, desc="PA masks", unit="img", disable=None, dynamic_ncols=True) as bar:
            def write(result: str | tuple[int, str]) -> None:
                if isinstance(result, tuple):
                    writer.skip(self.entries[result[0]], result[1])
                else:
                    writer.write([result])
                bar.update(1)

            if self.workers == 0:
                for job in self._jobs(batches):
                    write(image_record(job))
                return
            # fork shares the loaded modules at no cost (the workers run no torch); spawn where there is no fork
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with multiprocessing.get_context(method).Pool(self.workers, initializer=_init_worker) as pool:
                pending: deque = deque()
                for job in self._jobs(batches):
                    pending.append(pool.apply_async(image_record, (job,)))
                    while len(pending) > 2 * self.workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())


# ----------------------------------------------------------------------------- the job (single run)


class _Collector:
    """Keeps the records of a single run in memory (the engine writes them to part files instead)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.skipped: list[dict] = []

    def write(self, lines: list[str]) -> None:
        self.records += [json.loads(line) for line in lines]

    def skip(self, entry: ImageEntry, reason: str) -> None:
        print(f"warning: skipping {entry.path}: {reason}", file=sys.stderr)
        self.skipped.append({"file_name": entry.file_name, "reason": reason})


def grouping_options(args: argparse.Namespace) -> GroupingOptions:
    try:
        options = GroupingOptions(peak_radius=args.peak_radius, globalization=args.globalization,
                                  border_ratio=args.border_ratio, nms_iou=args.nms_iou, min_area=args.min_area,
                                  topk=args.topk)
        options.check()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return options


def generate_pa_masks(args: argparse.Namespace, settings: dict) -> int:
    """Run `gen_pa_masks.py`: returns the number of images written."""
    out = Path(args.pred_json_path)
    check_can_write(out, args.overwrite)
    check_writable(out)
    source = PAMaskSource(args.affinity, grouping_options(args), args.mask_format, args.gt_json, args.device,
                          args.num_workers)
    entries = dataset_entries(args)
    if args.max_images:
        entries = entries[: args.max_images]
    collector = _Collector()
    sizes: dict[int, tuple[int, int]] = {}
    for entry in entries:
        try:
            sizes[entry.index] = read_size(entry.path)
        except ImageReadError as exc:
            collector.skip(entry, str(exc))
    source.run(source.plan(entries, sizes), collector)

    records = sorted(collector.records, key=lambda r: r["index"])
    annotations = [{"id": n + 1, **a} for n, a in enumerate(a for r in records for a in r["annotations"])]
    write_json(out, {"info": {"description": "GGN pseudo-masks: top-k per image grouped from pairwise affinity",
                              "settings": settings},
                     "images": [r["image"] for r in records], "annotations": annotations,
                     "categories": CATEGORIES, "skipped_images": collector.skipped})
    write_json(results_path(out), annotations)
    save_config(settings, out.with_suffix(".config.yaml"))
    print(f"wrote {len(records)} images, {len(annotations)} masks ({len(collector.skipped)} skipped) to {out}")
    if collector.skipped:
        print(f"warning: skipped {len(collector.skipped)} unreadable image(s); they are listed under "
              "'skipped_images'", file=sys.stderr)
    return len(records)

