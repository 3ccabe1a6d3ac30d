"""The mask-generation job: shards, resumable per-image records, and the final COCO JSON.

Every run appends one JSON line per image to a part file under `<pred_json_path>.parts/`
(`shard-IIIII-of-NNNNN.jsonl.inprogress`, renamed without `.inprogress` once the shard is done).
A single-shard run, and `--merge` after a sharded one, assemble the parts into the final COCO
file in dataset order, streaming, so memory does not grow with the number of images.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.data import (ImageEntry, MaskGenDataset, class_agnostic, coco20k_entries, collate, folder_entries,
                          size_grouped_batches, upsample_patch_mask, voc_entries, worker_count)
from distill.features import discovery_features, feature_setting
from distill.maskgen import propose_masks
from distill.vit import build_vit, resolve_patch_size
from distill.visualize import save_overlay, write_gallery
from utils.coco_io import OBJECT_CATEGORY, atomic_path, check_can_write, make_annotation, write_json
from utils.config import save_config
from utils.distributed import resolve_device
from utils.errors import UserError
from utils.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, read_size
from utils.precision import autocast, precision_name, resolve_precision

CATEGORIES = [OBJECT_CATEGORY]
# Settings that change the masks: a resumed run or a merged shard must agree on all of them.
MASK_SETTINGS = ("dataset", "dataset_root", "year", "set", "coco_json", "file_list", "image_ids", "arch",
                 "patch_size", "weights", "features", "heads", "topk", "resize", "max_size", "mask_format",
                 "precision")


@dataclass
class RunStats:
    images: int = 0
    skipped: int = 0
    seconds: dict = field(default_factory=lambda: {"model": 0.0, "mask": 0.0, "encode": 0.0, "total": 0.0})


# ----------------------------------------------------------------------------- parts


def parts_dir(pred_json_path: Path) -> Path:
    return pred_json_path.with_name(pred_json_path.name + ".parts")


def part_path(pred_json_path: Path, shard: int, num_shards: int) -> Path:
    return parts_dir(pred_json_path) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def results_path(pred_json_path: Path) -> Path:
    """`masks.json` -> `masks.results.json`: the annotations alone, as a COCO results list."""
    return pred_json_path.with_suffix(".results.json")


def read_records(path: Path) -> tuple[dict | None, list[tuple[int, int]]]:
    """(header, [(index, byte offset)]) of a part file. A torn last line (a killed run) is dropped
    and truncated away, so the file can be appended to again."""
    header, offsets, good_end = None, [], 0
    with open(path, "rb+") as f:
        while True:
            offset = f.tell()
            line = f.readline()
            if not line:
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            good_end = f.tell()
            if record.get("kind") == "header":
                header = record
            else:
                offsets.append((record["index"], offset))
        f.truncate(good_end)
    return header, offsets


def check_settings(header: dict | None, settings: dict, source: Path) -> None:
    if header is None:
        return
    for key in MASK_SETTINGS:
        if header["settings"].get(key) != settings.get(key):
            raise UserError(f"{source} was made with {key}={header['settings'].get(key)!r}, not "
                            f"{settings.get(key)!r}; use the same settings, or --overwrite to start again")


def assemble(part_files: list[Path], out_path: Path, settings: dict) -> tuple[int, int]:
    """Stream the records of all parts, in dataset order, into one COCO file. Returns (images, skipped)."""
    located = []
    for file_number, path in enumerate(part_files):
        header, offsets = read_records(path)
        check_settings(header, settings, path)
        located += [(index, file_number, offset) for index, offset in offsets]
    located.sort()
    for (a, _, _), (b, _, _) in zip(located, located[1:]):
        if a == b:
            raise UserError(f"image #{a} appears in two parts of {parts_dir(out_path)}; rerun its shard with --overwrite")
    handles = [open(p, "rb") for p in part_files]

    def records(kind: str) -> Iterator[dict]:
        for _, file_number, offset in located:
            handles[file_number].seek(offset)
            record = json.loads(handles[file_number].readline())
            if kind in record:
                yield record

    info = {"description": "MaskDistill pseudo-masks (one object per image)",
            "settings": {k: settings.get(k) for k in MASK_SETTINGS}}
    counts = [0, 0]
    try:
        with atomic_path(out_path) as tmp, open(tmp, "w") as out:
            out.write('{"info": ' + json.dumps(info) + ',\n"images": [')
            for n, record in enumerate(records("image")):
                out.write(("," if n else "") + "\n" + json.dumps(record["image"]))
                counts[0] += 1
            out.write('],\n"annotations": [')
            for n, record in enumerate(records("annotation")):
                out.write(("," if n else "") + "\n" + json.dumps({"id": n + 1, **record["annotation"]}))
            out.write('],\n"categories": ' + json.dumps(CATEGORIES) + ',\n"skipped_images": [')
            for n, record in enumerate(records("skipped")):
                out.write(("," if n else "") + "\n" + json.dumps(record["skipped"]))
                counts[1] += 1
            out.write("]}\n")
        # The same annotations as a COCO results list, the form `COCO.loadRes(path)` and evaluators take.
        with atomic_path(results_path(out_path)) as tmp, open(tmp, "w") as out:
            out.write("[")
            for n, record in enumerate(records("annotation")):
                out.write(("," if n else "") + "\n" + json.dumps({"id": n + 1, **record["annotation"]}))
            out.write("]\n")
    finally:
        for h in handles:
            h.close()
    return counts[0], counts[1]


# ----------------------------------------------------------------------------- job


def dataset_entries(args: argparse.Namespace) -> list[ImageEntry]:
    root = Path(args.dataset_root)
    if not root.is_dir():
        raise UserError(f"--dataset_root {root} is not a directory")
    if args.dataset == "VOCClass":
        return voc_entries(root, args.year, args.set, args.voc_split_folder)
    if args.dataset == "COCO20k":
        if not args.coco_json or not args.file_list:
            raise UserError("--dataset COCO20k needs --coco_json and --file_list")
        entries, subset = coco20k_entries(root, Path(args.coco_json), Path(args.file_list))
        out_dir = Path(args.pred_json_path).parent
        if not (out_dir / "coco20k_gt.json").exists() or args.overwrite:
            write_json(out_dir / "coco20k_gt.json", subset)
            write_json(out_dir / "coco20k_gt_class_agnostic.json", class_agnostic(subset))
        return entries
    return folder_entries(root, args.image_ids)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= shard < count):
        raise UserError(f"--shard {text}: need 0 <= i < N")
    return shard, count


def settings_of(args: argparse.Namespace) -> dict:
    settings = {k: getattr(args, k, None) for k in MASK_SETTINGS}
    if settings["dataset_root"]:
        settings["dataset_root"] = str(Path(settings["dataset_root"]).resolve())
    return settings


def merge(args: argparse.Namespace) -> int:
    out = Path(args.pred_json_path)
    check_can_write(out, args.overwrite)
    folder = parts_dir(out)
    finished = sorted(folder.glob("shard-*-of-*.jsonl")) if folder.is_dir() else []
    if not finished:
        raise UserError(f"no finished shard parts in {folder}; run the shards first")
    count = int(finished[0].name.split("-of-")[1].split(".")[0])
    missing = [i for i in range(count) if not part_path(out, i, count).exists()]
    if missing:
        raise UserError(f"cannot merge: shard(s) {missing} of {count} are not finished in {folder}")
    header, _ = read_records(finished[0])
    images, skipped = assemble([part_path(out, i, count) for i in range(count)], out, header["settings"])
    save_config(header["settings"], out.with_suffix(".config.yaml"))
    print(f"merged {count} shards: {images} images, {skipped} skipped -> {out}")
    return 0


def generate(args: argparse.Namespace) -> RunStats:
    """Run (one shard of) the mask generation described by the parsed `gen_masks.py` arguments."""
    out = Path(args.pred_json_path)
    shard, num_shards = parse_shard(args.shard)
    # Resolved before they are recorded: a resume on other hardware must not silently change precision.
    args.patch_size = resolve_patch_size(args.arch, args.patch_size)
    args.features = feature_setting(args.arch, args.features)
    args.precision = precision_name(resolve_precision(args.precision, resolve_device(args.device)))
    settings = settings_of(args)
    if num_shards == 1:
        check_can_write(out, args.overwrite)
    final_part = part_path(out, shard, num_shards)
    progress_part = final_part.with_name(final_part.name + ".inprogress")
    if args.overwrite:
        for p in (final_part, progress_part):
            p.unlink(missing_ok=True)
    if final_part.exists():
        raise UserError(f"shard {shard}/{num_shards} is already finished ({final_part}); "
                        "run --merge, or --overwrite to redo it")

    entries = dataset_entries(args)
    if args.max_images:
        entries = entries[: args.max_images]

    done: set[int] = set()
    if progress_part.exists():
        if not args.resume:
            raise UserError(f"unfinished results exist in {progress_part}; pass --resume to continue, "
                            "or --overwrite to start again")
        header, offsets = read_records(progress_part)
        check_settings(header, settings, progress_part)
        done = {index for index, _ in offsets}
    else:
        progress_part.parent.mkdir(parents=True, exist_ok=True)
        with open(progress_part, "w") as f:
            f.write(json.dumps({"kind": "header", "settings": settings}) + "\n")

    stats = RunStats()
    start = time.perf_counter()
    sizes: dict[int, tuple[int, int]] = {}
    unreadable: list[tuple[ImageEntry, str]] = []
    for entry in tqdm(entries, desc="image sizes", unit="img", disable=None, leave=False):
        try:  # header reads only: cheap, and they catch most unreadable files early
            sizes[entry.index] = read_size(entry.path)
        except ImageReadError as exc:
            unreadable.append((entry, str(exc)))
    # Batches are planned over the whole dataset and then dealt to the shards, so every image is
    # computed in the same batch however the job is sharded or resumed: the outputs are identical.
    dataset = MaskGenDataset(entries, sizes, args.resize, args.max_size, args.patch_size)
    batches = size_grouped_batches(dataset, sorted(sizes), args.batch_size)[shard::num_shards]
    batches = [b for b in batches if any(index not in done for index in b)]
    with open(progress_part, "a") as part:
        for entry, reason in unreadable:
            if entry.index % num_shards == shard and entry.index not in done:
                _skip(part, entry, reason, stats)
        if batches:
            _run_model(args, dataset, batches, done, part, stats)
    stats.seconds["total"] = time.perf_counter() - start
    if stats.skipped:
        print(f"warning: skipped {stats.skipped} unreadable image(s); they are listed under 'skipped_images'",
              file=sys.stderr)

    progress_part.rename(final_part)
    if num_shards == 1:
        images, skipped = assemble([final_part], out, settings)
        save_config(settings, out.with_suffix(".config.yaml"))
        shutil.rmtree(parts_dir(out))
        print(f"wrote {images} images ({skipped} skipped) to {out}")
    else:
        print(f"shard {shard}/{num_shards} done: {final_part}; run with --merge once every shard is done")
    if args.vis_dir:
        write_gallery(Path(args.vis_dir))
    return stats


def _skip(part: TextIO, entry: ImageEntry, reason: str, stats: RunStats) -> None:
    print(f"warning: skipping {entry.path}: {reason}", file=sys.stderr)
    part.write(json.dumps({"index": entry.index, "skipped": {"file_name": entry.file_name, "reason": reason}}) + "\n")
    stats.skipped += 1


def _run_model(args: argparse.Namespace, dataset: MaskGenDataset, batches: list[list[int]], done: set[int],
               part: TextIO, stats: RunStats) -> None:
    device = resolve_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.weights).to(device)
    entries, sizes = dataset.entries, dataset.sizes
    workers = worker_count(args.num_workers)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    precision = autocast(resolve_precision(args.precision, device), device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    patch = args.patch_size
    with tqdm(total=sum(map(len, batches)), desc="masks", unit="img", disable=None, dynamic_ncols=True) as bar:
        for batch in loader:
            for index, reason in batch["failed"]:
                if index not in done:
                    _skip(part, entries[index], reason, stats)
            if batch["images"] is not None:
                t0 = time.perf_counter()
                images = batch["images"].to(device, non_blocking=True)
                with torch.inference_mode(), precision:
                    features = discovery_features(model.last_qk(images), args.features)
                sync()
                t1 = time.perf_counter()
                grid_h, grid_w = images.shape[2] // patch, images.shape[3] // patch
                with torch.inference_mode():
                    proposals = propose_masks(features.query, features.key, grid_h, grid_w, heads=args.heads,
                                              topk=args.topk, graph_key=features.graph_key)
                t2 = time.perf_counter()
                lines = []
                for slot, (index, proposal) in enumerate(zip(batch["indices"], proposals)):
                    if index in done:  # recomputed only because its batch was cut short
                        continue
                    entry = entries[index]
                    height, width = sizes[index]
                    resized, _ = dataset.target_sizes(index)
                    mask = upsample_patch_mask(proposal.mask, patch, resized, (height, width))
                    annotation = make_annotation(mask, entry.image_id, 1, proposal.score, args.mask_format)
                    image = {"id": entry.image_id, "file_name": entry.file_name, "height": height, "width": width}
                    lines.append(json.dumps({"index": index, "image": image, "annotation": annotation}))
                    if args.vis_dir:
                        save_overlay(batch["images"][slot], proposal, resized, patch, entry.file_name,
                                     Path(args.vis_dir), IMAGENET_MEAN, IMAGENET_STD)
                if lines:
                    part.write("\n".join(lines) + "\n")
                    part.flush()
                stats.seconds["model"] += t1 - t0
                stats.seconds["mask"] += t2 - t1
                stats.seconds["encode"] += time.perf_counter() - t2
                stats.images += len(lines)
            bar.update(len(batch["indices"]) + len(batch["failed"]))


def run(args: argparse.Namespace) -> RunStats:
    """`generate`, or under `torchrun` one shard per rank followed by a merge on rank 0."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return generate(args)
    from utils.distributed import barrier, cleanup, init_distributed

    info = init_distributed(args.device)
    if args.shard != "0/1":
        raise UserError("--shard is set by torchrun (one shard per rank); leave it out")
    if Path(args.pred_json_path).exists() and not args.overwrite:
        raise UserError(f"output {args.pred_json_path} already exists; pass --overwrite to replace it")
    args.shard = f"{info.rank}/{info.world_size}"
    if info.device.type == "cuda":
        args.device = str(info.device)
    try:
        stats = generate(args)
        barrier()
        if info.is_main:
            merge(args)
            shutil.rmtree(parts_dir(Path(args.pred_json_path)))
        barrier()
    finally:
        cleanup()
    return stats
