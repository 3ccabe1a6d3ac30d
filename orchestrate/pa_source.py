"""Pseudo-masks from pairwise affinity (GGN): the PA map of each image, from its ground truth (the
oracle) or from a trained PA predictor, grouped into its top-k class-agnostic masks
(distill/grouping.py) and written as COCO annotations with scores.

`PAMaskSource` is a mask source of the generation job (distill/generate.py): `plan` lays out the
batches over the data set (one image each), `run` processes them and hands one record per image to
the job's writer, so `gen_pa_masks.py` gets shards, `--resume`, `--merge`, skipped images, atomic
output and the `--vis_dir` gallery from the job. The grouping, the CPU-heavy part, runs in worker
processes while the main process reads images and runs the predictor; records come back in
data-set order. The recorded settings include the SHA-256 of the PA checkpoint (or of the oracle's
GT), so a resume or a merge refuses parts grouped from another predictor.

`gen_pa_masks.py` hands its parsed flags to `gen_pa_masks_from_args` once, which checks them into a
frozen `PAMasksSettings` (or a `MergeParts` for --merge) that `generate_pa_masks` runs.
"""
from __future__ import annotations

import argparse
from collections import deque
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping

import torchvision.transforms.functional as TF

from detectron2_train.affinity import AFFINITY_INPUT_DEFAULTS, load_affinity_model, predict_affinity
from distill.cli import ImageSetOptions, OutputOptions, settings_from
from distill.data import ImageEntry
from distill.generate import MaskJob, MergeParts, PartWriter, RunStats, load_image_set, merge, run
from distill.grouping import GroupingOptions, image_record
from distill.visualize import overlay_name
from utils.cli import check_outputs, options_from
from utils.coco_io import annotations_by_image, find_by_file_name, image_index, load_coco_dataset, names_all_images
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.fingerprint import file_digest
from utils.images import ImageReadError, load_rgb, read_size
from utils.progress import progress
from utils.workers import default_workers, worker_pool

ORACLE = "oracle"


# ----------------------------------------------------------------------------- the source


class PAMaskSource:
    """Top-k masks per image from the oracle (`affinity='oracle'`, with `gt_json`) or a PA checkpoint;
    with `vis_dir`, an overlay PNG of each image's masks there."""

    def __init__(self, affinity: str, options: GroupingOptions, mask_format: str = "rle", gt_json: str | None = None,
                 device: str = "auto", workers: int | None = None, vis_dir: str | None = None):
        options.check()
        self.options, self.mask_format = options, mask_format
        self.workers = default_workers(workers, at_most=4, spare=1, at_least=0)
        self.vis_dir = Path(vis_dir) if vis_dir else None
        self.model = None
        if affinity == ORACLE:
            if not gt_json:
                raise UserError("--affinity oracle needs --gt_json (the ground truth the affinity is computed from)")
            gt = load_coco_dataset(gt_json)
            self.gt_json, self.gt_images, self.gt_annotations = gt_json, gt["images"], annotations_by_image(gt["annotations"])
        else:
            self.device = resolve_device(device)
            self.model, config = load_affinity_model(affinity, self.device)
            sizes = {**AFFINITY_INPUT_DEFAULTS, **config.get("input", {})}
            self.min_size, self.max_size = int(sizes["min_size_test"]), int(sizes["max_size_test"])

    def check_gt(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> None:
        """Oracle: every image must be in the GT, with the size the GT gives it. Images are matched by file_name
        (`find_by_file_name`), whatever the ids; by id when the GT does not name all its images."""
        by_name = names_all_images(self.gt_images)
        if by_name:
            found = find_by_file_name([e.file_name for e in entries], self.gt_images, f"--gt_json {self.gt_json}")
        else:
            by_id = image_index({"images": self.gt_images})
            found = [by_id.get(e.image_id) for e in entries]
        self.gt_ids = {}
        for entry, gt_image in zip(entries, found):
            if gt_image is None:
                how = "matched by file_name" if by_name else f"image id {entry.image_id}; the GT names no files"
                raise UserError(f"{entry.file_name} is not in --gt_json {self.gt_json} ({how}); pass the ground "
                                "truth of these images, or --exclude GLOB to leave some out")
            if entry.index in sizes and sizes[entry.index] != (gt_image["height"], gt_image["width"]):
                raise UserError(f"{entry.file_name} is {sizes[entry.index][0]}x{sizes[entry.index][1]} (height x "
                                f"width) but --gt_json says {gt_image['height']}x{gt_image['width']}")
            self.gt_ids[entry.index] = gt_image["id"]

    def plan(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> list[list[int]]:
        """One image per batch, in data-set order (the readable images of `sizes`)."""
        self.entries = {e.index: e for e in entries}
        self.sizes = sizes
        if self.model is None:
            self.check_gt(entries, sizes)
        return [[index] for index in sorted(sizes)]

    def _jobs(self, batches: list[list[int]], done: set[int]) -> Iterator[dict]:
        options = asdict(self.options)
        for batch in batches:
            for index in batch:
                if index in done:
                    continue
                entry = self.entries[index]
                height, width = self.sizes[index]
                image = {"id": entry.image_id, "file_name": entry.file_name, "height": height, "width": width}
                job = {"index": index, "image": image, "options": options, "mask_format": self.mask_format}
                if self.vis_dir is not None:
                    job["overlay"] = (str(entry.path), str(self.vis_dir / overlay_name(entry.file_name)))
                if self.model is None:
                    job["annotations"] = self.gt_annotations.get(self.gt_ids[index], [])
                else:
                    try:
                        pixels = load_rgb(entry.path)
                    except ImageReadError as exc:
                        yield {"index": index, "error": str(exc)}
                        continue
                    job["pa"] = predict_affinity(self.model, TF.pil_to_tensor(pixels).float().div_(255),
                                                 self.min_size, self.max_size)
                yield job

    def run(self, batches: list[list[int]], writer: PartWriter) -> None:
        """Group every image of `batches`; records are written in order, at most 2 x workers pending."""
        if self.vis_dir is not None:
            self.vis_dir.mkdir(parents=True, exist_ok=True)
        total = sum(index not in writer.done for batch in batches for index in batch)
        with progress(total=total, desc="PA masks", unit="img") as bar:
            def write(result: tuple[str, int] | tuple[int, str]) -> None:
                if isinstance(result[0], int):
                    writer.skip(self.entries[result[0]], result[1])
                else:
                    writer.write([result[0]])
                    writer.stats.annotations += result[1]
                bar.update(1)

            jobs = self._jobs(batches, writer.done)
            if self.workers == 0:
                for job in jobs:
                    write(image_record(job))
                return
            with worker_pool(self.workers) as pool:
                pending: deque = deque()
                for job in jobs:
                    pending.append(pool.apply_async(image_record, (job,)))
                    while len(pending) > 2 * self.workers:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class PAMasksSettings:
    """Everything a `gen_pa_masks.py` run takes, checked (`gen_pa_masks_from_args`)."""

    job: MaskJob
    affinity: str  # 'oracle' or a PA predictor checkpoint
    gt_json: str | None  # the oracle's GT
    grouping: GroupingOptions
    num_workers: int | None = None  # grouping worker processes (None: min(4, CPUs - 1))


def make_source(settings: PAMasksSettings, job: MaskJob) -> PAMaskSource:
    """The source of `gen_pa_masks.py`'s settings, for `job` (under torchrun, the rank's). The oracle checks
    here, before the job writes anything, that its GT knows every image of the set with the same size."""
    try:
        settings.grouping.check()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    output = job.output
    source = PAMaskSource(settings.affinity, settings.grouping, output.mask_format, settings.gt_json, job.device,
                          settings.num_workers, vis_dir=output.vis_dir)
    if source.model is None:
        entries = load_image_set(job.images)[0]  # reads only: the job writes
        sizes = {}
        for entry in entries:
            try:
                sizes[entry.index] = read_size(entry.path)
            except ImageReadError:
                pass  # skipped by the job
        source.check_gt(entries, sizes)
    return source


def pa_settings(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> dict:
    """The recorded settings: the setting flags (of `values`, flag dest -> value), with paths resolved and the
    SHA-256 of the file the PA comes from (the checkpoint, or the oracle's GT), so that a retrained predictor
    is not mixed in."""
    # "method" names the source in the output's info.description ("ggn pseudo-masks"), as gen_masks.py's --method does.
    settings = {"method": "ggn", **settings_from(parser, values)}
    affinity, gt_json = values["affinity"], values["gt_json"]
    source_file = gt_json if affinity == ORACLE else affinity
    if affinity != ORACLE:
        settings["affinity"] = str(Path(affinity).resolve())
    if settings.get("gt_json"):
        settings["gt_json"] = str(Path(gt_json).resolve())
    # A missing file is reported by the source, after the job has checked the outputs.
    settings["affinity_sha256"] = file_digest(source_file) if Path(source_file).is_file() else None
    return settings


def gen_pa_masks_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> PAMasksSettings | MergeParts:
    """`gen_pa_masks.py`'s parsed flags, checked into its settings (`args` is left as it is); with --merge, the
    merge of the output's shard parts."""
    values = vars(args)
    output = options_from(OutputOptions, values)
    # The outputs first (as every command), before any input is read; a shard's existing output is the merge's business.
    check_outputs(output.pred_json_path, folders=[output.vis_dir],
                  overwrite=output.overwrite if output.shard == "0/1" else None)
    if args.merge:
        return MergeParts(output)
    if not args.dataset or not args.dataset_root:
        raise UserError("--dataset and --dataset_root are required (or --merge)")
    if args.affinity is None:
        raise UserError("--affinity is required (or --merge)")
    if args.affinity == ORACLE and not args.gt_json:
        raise UserError("--affinity oracle needs --gt_json (the ground truth the affinity is computed from)")
    job = MaskJob(options_from(ImageSetOptions, values), output, pa_settings(parser, values), args.device)
    return PAMasksSettings(job, args.affinity, args.gt_json, options_from(GroupingOptions, values), args.num_workers)


def generate_pa_masks(command: PAMasksSettings | MergeParts) -> RunStats | None:
    """`gen_pa_masks.py`: merge shard parts, or run the job (None after a merge)."""
    if isinstance(command, MergeParts):
        merge(command.output)
        return None
    return run(command.job, partial(make_source, command))
