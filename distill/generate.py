"""The mask-generation job, for any mask source: image sets, shards, resumable part files, the final COCO JSON.

A *mask source* turns batches of images into records (`gen_masks.py`'s is `distill.engine.ViTMaskSource`;
any other, e.g. a trained predictor, implements the same two methods):

    class MaskSource(Protocol):
        def plan(self, entries, sizes) -> list[list[int]]   # batches over the whole data set
        def run(self, batches, writer: PartWriter) -> None  # process them, writing through `writer`

`generate(job, make_source)` does the rest for a `MaskJob` (the typed options of the image-set and
output flags, `distill.cli.ImageSetOptions` and `OutputOptions`, the device and the recorded settings;
a command builds it once from its parsed flags and nothing changes it): it reads the image set, checks
the outputs, builds the source with `make_source(job)`, deals the planned batches to `--shard i/N` (so
every image is computed in the same batch however the job is sharded or resumed), skips unreadable
images, and appends one JSON line per image to a part file under `<pred_json_path>.parts/`
(`shard-IIIII-of-NNNNN.jsonl.inprogress`, renamed without `.inprogress` once the shard is done). A
single-shard run, and `merge` after a sharded one, assemble the parts into the final COCO file in
data-set order, streaming, so memory does not grow with the number of images. Every part starts with a
header holding the run's settings (the flags of `distill.cli.SETTING_GROUPS` argument groups) and their
fingerprint (utils/fingerprint.py: a file named by a setting, e.g. the weights, by its SHA-256): a resume
or a merge refuses parts made with other settings, or with a file since rewritten at the same path.
`run(job, make_source)` is `generate`, or under torchrun one shard per rank and a merge.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Protocol, TextIO

from distill.cli import RECORDED_ONLY, ImageSetOptions, OutputOptions
from distill.data import ImageEntry, class_agnostic, coco20k_entries, folder_entries, voc_entries
from distill.visualize import write_gallery
from utils.coco_io import (OBJECT_CATEGORY, atomic_path, check_can_write, check_writable, check_writable_folder,
                           write_json)
from utils.config import save_config
from utils.errors import UserError
from utils.fingerprint import difference, fingerprint
from utils.images import ImageReadError, read_size
from utils.lock import LockHeld, open_locked, record_holder
from utils.progress import progress

CATEGORIES = [OBJECT_CATEGORY]
FINGERPRINT_KIND = "mask generation"


@dataclass
class RunStats:
    images: int = 0
    annotations: int = 0
    skipped: int = 0
    seconds: dict = field(default_factory=lambda: {"model": 0.0, "mask": 0.0, "post": 0.0, "total": 0.0})


class PartWriter:
    """Appends image records to the part file of a shard; images already in it (`done`) are not written twice."""

    def __init__(self, part: TextIO, done: set[int], stats: RunStats) -> None:
        self.part, self.done, self.stats = part, done, stats

    def write(self, lines: list[str]) -> None:
        """Record lines of finished images (`{"index", "image", "annotations"}`), flushed at once."""
        if lines:
            self.part.write("\n".join(lines) + "\n")
            self.part.flush()
            self.stats.images += len(lines)

    def skip(self, entry: ImageEntry, reason: str) -> None:
        """Record an image that cannot be read (listed under `skipped_images`)."""
        if entry.index in self.done:
            return
        print(f"warning: skipping {entry.path}: {reason}", file=sys.stderr)
        self.part.write(json.dumps({"index": entry.index, "skipped": {"file_name": entry.file_name, "reason": reason}})
                        + "\n")
        self.part.flush()
        self.stats.skipped += 1


class MaskSource(Protocol):
    def plan(self, entries: list[ImageEntry], sizes: dict[int, tuple[int, int]]) -> list[list[int]]: ...

    def run(self, batches: list[list[int]], writer: PartWriter) -> None: ...


@dataclass(frozen=True)
class MaskJob:
    """One mask-generation job: what it reads, where it writes, its device, and the settings it records
    (`distill.cli.settings_from`: the header of every part, the output's `info.settings`, its `.config.yaml`)."""

    images: ImageSetOptions
    output: OutputOptions
    settings: dict
    device: str = "auto"


@dataclass(frozen=True)
class MergeParts:
    """The `--merge` mode of a mask-generation command: join the finished shard parts of `output`."""

    output: OutputOptions


# ----------------------------------------------------------------------------- parts


def parts_dir(pred_json_path: Path) -> Path:
    return pred_json_path.with_name(pred_json_path.name + ".parts")


def part_path(pred_json_path: Path, shard: int, num_shards: int) -> Path:
    return parts_dir(pred_json_path) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def results_path(pred_json_path: Path) -> Path:
    """`masks.json` -> `masks.results.json`: the annotations alone, as a COCO results list."""
    return pred_json_path.with_suffix(".results.json")


class PartError(UserError):
    """A part file that is not what the job wrote: a corrupt or missing record, or fewer records than planned."""


@dataclass
class PartScan:
    header: dict | None
    offsets: list[tuple[int, int]]  # (image index, byte offset) of each record
    good_end: int  # byte offset after the last whole record


def _record_problem(record: object) -> str | None:
    """Why a parsed line is not an image record, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return "no image 'index'"
    if "skipped" in record:
        return None if isinstance(record["skipped"], dict) else "a malformed 'skipped' entry"
    if not isinstance(record.get("image"), dict) or not isinstance(record.get("annotations"), list):
        return "no 'image' and 'annotations'"
    return None


def scan_part(path: Path, finished: bool) -> PartScan:
    """Read and check every line of a part file: a header, then one record per image. In an unfinished part
    the last line may be torn by a kill (it is left out: the caller truncates it away and the image is
    redone); any other bad line, and any bad line of a finished part, is a `PartError` naming the line."""
    header, offsets, good_end = None, [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(iter(f.readline, b""), start=1):
            try:
                record = json.loads(line)
                problem = None if line.endswith(b"\n") else "cut short"
            except (json.JSONDecodeError, UnicodeDecodeError):
                record, problem = None, "not valid JSON"
            if problem is None:
                if number == 1:
                    if not (isinstance(record, dict) and record.get("kind") == "header"
                            and isinstance(record.get("settings"), dict)):
                        problem = "not the part's header"
                else:
                    problem = _record_problem(record)
            if problem is not None:
                if not finished and not f.readline():  # the last line of an unfinished part: torn by a kill
                    break
                raise PartError(f"{path}: line {number}: {problem}; the part is corrupt: rerun its shard with "
                                "--overwrite")
            if number == 1:
                header = record
            else:
                offsets.append((record["index"], good_end))
            good_end = f.tell()
    return PartScan(header, offsets, good_end)


def peek_part(path: Path) -> tuple[dict | None, bool]:
    """(header, whether any image record follows it) of an unfinished part, read without changing it."""
    with open(path, "rb") as f:
        first, second = f.readline(), f.readline()
    try:
        header = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not (isinstance(header, dict) and header.get("kind") == "header" and isinstance(header.get("settings"), dict)):
        header = None
    return header, bool(second.strip())


def settings_fingerprint(settings: dict) -> dict:
    """The fingerprint (utils/fingerprint.py) of a job's recorded settings: a setting naming a file (the weights,
    a list or GT file) counts by its content, so a file rewritten at the same path is a changed setting. What is
    only recorded (RECORDED_ONLY: how the precision was chosen) is left out."""
    return fingerprint(FINGERPRINT_KIND, {k: v for k, v in settings.items() if k not in RECORDED_ONLY})


def part_fingerprint(header: dict) -> dict:
    """The fingerprint a part's header records (parts written before it was recorded: that of its settings now)."""
    recorded = header.get("fingerprint")
    return recorded if isinstance(recorded, dict) else settings_fingerprint(header["settings"])


def check_settings(header: dict | None, current: dict, source: Path) -> None:
    """Refuse a part whose header records another fingerprint than `current`, naming the first difference."""
    if header is None:
        return
    # in flag order: a method before its flags
    reason = difference(part_fingerprint(header), current, first=list(header["settings"]))
    if reason is not None:
        raise UserError(f"{source}: {reason}; use the same settings, or --overwrite to start again")


class PartLock:
    """An exclusive, non-blocking `flock` on `<part>.lock`, held for a whole run of one shard, so that two runs
    on the same `--pred_json_path` (a second one with --overwrite or --resume included) never write the same part:
    the second is refused, naming the first. The lock file holds the holder's pid, host and start time; it is
    never removed while held (a removed and recreated file would let a second holder in)."""

    def __init__(self, part: Path) -> None:
        self.path = part.with_name(part.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "PartLock":
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = open_locked(self.path)
        except LockHeld as held:
            raise UserError(f"another run is writing {self.path.with_suffix('')} ({held.holder}); wait for it to "
                            "finish or stop it, then run again") from None
        record_holder(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


def assemble(part_files: list[Path], out_path: Path, settings: dict, expected: dict) -> tuple[int, int]:
    """Stream the records of all parts, made with the fingerprint `expected`, in data-set order, into one COCO
    file with `settings` in its info. Returns (images, skipped)."""
    located = []
    for file_number, path in enumerate(part_files):
        scan = scan_part(path, finished=True)
        if scan.header is None:
            raise PartError(f"{path} is empty: rerun its shard with --overwrite")
        check_settings(scan.header, expected, path)
        planned = scan.header.get("planned_images")  # absent in parts written before it was recorded
        if planned is not None and planned != len(scan.offsets):
            raise PartError(f"{path} holds {len(scan.offsets)} image records but its shard planned {planned}; "
                            "rerun its shard with --overwrite")
        located += [(index, file_number, offset) for index, offset in scan.offsets]
    located.sort()
    for (a, file_a, _), (b, file_b, _) in zip(located, located[1:]):
        if a == b:
            where = f"twice in {part_files[file_a]}" if file_a == file_b else f"in two parts of {parts_dir(out_path)}"
            raise PartError(f"image #{a} appears {where}; rerun its shard with --overwrite")
    handles = [open(p, "rb") for p in part_files]

    def records(kind: str) -> Iterator[dict]:
        for _, file_number, offset in located:
            handles[file_number].seek(offset)
            record = json.loads(handles[file_number].readline())
            if kind in record:
                yield record

    def annotations() -> Iterator[str]:
        n = 0
        for record in records("annotations"):
            for annotation in record["annotations"]:
                n += 1
                yield json.dumps({"id": n, **annotation})

    info = {"description": f"{settings.get('method', 'gen_masks')} pseudo-masks", "settings": settings}
    counts = [0, 0]
    try:
        with atomic_path(out_path) as tmp, open(tmp, "w") as out:
            out.write('{"info": ' + json.dumps(info) + ',\n"images": [')
            for n, record in enumerate(records("image")):
                out.write(("," if n else "") + "\n" + json.dumps(record["image"]))
                counts[0] += 1
            out.write('],\n"annotations": [')
            for n, line in enumerate(annotations()):
                out.write(("," if n else "") + "\n" + line)
            out.write('],\n"categories": ' + json.dumps(CATEGORIES) + ',\n"skipped_images": [')
            for n, record in enumerate(records("skipped")):
                out.write(("," if n else "") + "\n" + json.dumps(record["skipped"]))
                counts[1] += 1
            out.write("]}\n")
        # The same annotations as a COCO results list, the form `COCO.loadRes(path)` and evaluators take.
        with atomic_path(results_path(out_path)) as tmp, open(tmp, "w") as out:
            out.write("[")
            for n, line in enumerate(annotations()):
                out.write(("," if n else "") + "\n" + line)
            out.write("]\n")
    finally:
        for h in handles:
            h.close()
    return counts[0], counts[1]


# ----------------------------------------------------------------------------- job


def load_image_set(images: ImageSetOptions) -> tuple[list[ImageEntry], dict | None]:
    """The images of the set (the first `max_images`, when given), and for COCO20k the subset's GT (written by
    `write_subset_gt`). Reads only: nothing is written, so a refused run leaves nothing behind."""
    root = Path(images.dataset_root)
    if not root.is_dir():
        raise UserError(f"--dataset_root {root} is not a directory")
    if images.dataset != "folder" and (images.exclude or images.image_ids.startswith("from:")):
        flag = "--exclude" if images.exclude else "--gt_json (--image_ids from:)"
        raise UserError(f"{flag} applies to --dataset folder; {images.dataset} names its images itself")
    subset = None
    if images.dataset == "VOCClass":
        entries = voc_entries(root, images.year, images.set, images.voc_split_folder)
    elif images.dataset == "COCO20k":
        if not images.coco_json or not images.file_list:
            raise UserError("--dataset COCO20k needs --coco_json and --file_list")
        entries, subset = coco20k_entries(root, Path(images.coco_json), Path(images.file_list))
    else:
        entries = folder_entries(root, images.image_ids, list(images.exclude), images.skip_images_not_in_gt)
    return entries[: images.max_images or None], subset


def write_subset_gt(output: OutputOptions, subset: dict | None) -> None:
    """COCO20k: the subset's GT and its class-agnostic twin, next to the output (kept unless --overwrite)."""
    if subset is None:
        return
    out_dir = Path(output.pred_json_path).parent
    if not (out_dir / "coco20k_gt.json").exists() or output.overwrite:
        write_json(out_dir / "coco20k_gt.json", subset)
        write_json(out_dir / "coco20k_gt_class_agnostic.json", class_agnostic(subset))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= shard < count):
        raise UserError(f"--shard {text}: need 0 <= i < N")
    return shard, count


def merge(output: OutputOptions) -> int:
    """Join the finished shard parts into `output.pred_json_path`. Every record of every part is checked first
    (`scan_part`, and its count against the images its shard planned): a corrupt part stops the merge,
    naming its file and line, before the output is written."""
    out = Path(output.pred_json_path)
    check_writable(out)
    check_can_write(out, output.overwrite)
    folder = parts_dir(out)
    finished = sorted(folder.glob("shard-*-of-*.jsonl")) if folder.is_dir() else []
    if not finished:
        raise UserError(f"no finished shard parts in {folder}; run the shards first")
    count = int(finished[0].name.split("-of-")[1].split(".")[0])
    missing = [i for i in range(count) if not part_path(out, i, count).exists()]
    if missing:
        raise UserError(f"cannot merge: shard(s) {missing} of {count} are not finished in {folder}")
    header = scan_part(finished[0], finished=True).header
    if header is None:
        raise PartError(f"{finished[0]} is empty: rerun its shard with --overwrite")
    images, skipped = assemble([part_path(out, i, count) for i in range(count)], out, header["settings"],
                               part_fingerprint(header))
    save_config(header["settings"], out.with_suffix(".config.yaml"))
    print(f"merged {count} shards: {images} images, {skipped} skipped -> {out}")
    return 0


def check_part_state(final_part: Path, progress_part: Path, output: OutputOptions, current: dict,
                     shard_name: str) -> None:
    """Refuse what would mix or lose results: a finished part (without --overwrite), an unfinished one with
    image records (without --resume or --overwrite) or made with other settings (with --resume). Reads only;
    an unfinished part holding no image record (a run stopped before its first image) is simply replaced."""
    if output.overwrite:
        return
    if final_part.exists():
        raise UserError(f"shard {shard_name} is already finished ({final_part}); run --merge, or --overwrite to redo it")
    if not progress_part.exists():
        return
    header, has_records = peek_part(progress_part)
    if not has_records:
        return
    if not output.resume:
        raise UserError(f"unfinished results exist in {progress_part}; pass --resume to continue, "
                        "or --overwrite to start again")
    check_settings(header, current, progress_part)


def generate(job: MaskJob, make_source: Callable[[MaskJob], MaskSource]) -> RunStats:
    """Run (one shard of) a mask-generation job with the mask source `make_source(job)`.

    Everything that can refuse the run (flags, outputs, the existing parts, the image set, the source with its
    weights) is checked before any file or folder is created, so a refused run leaves nothing behind. The shard's
    part is then locked (`PartLock`) for the whole run and its state checked again under the lock."""
    output, settings = job.output, job.settings
    current = settings_fingerprint(settings)
    out = Path(output.pred_json_path)
    shard, num_shards = parse_shard(output.shard)
    check_writable(out)
    if output.vis_dir:
        check_writable_folder(output.vis_dir, f"--vis_dir {output.vis_dir}")
    if num_shards == 1:
        check_can_write(out, output.overwrite)
    final_part = part_path(out, shard, num_shards)
    progress_part = final_part.with_name(final_part.name + ".inprogress")
    check_part_state(final_part, progress_part, output, current, f"{shard}/{num_shards}")
    entries, subset = load_image_set(job.images)
    source = make_source(job)

    stats = RunStats()
    start = time.perf_counter()
    sizes: dict[int, tuple[int, int]] = {}
    unreadable: list[tuple[ImageEntry, str]] = []
    for entry in progress(entries, desc="image sizes", unit="img", leave=False):
        try:  # header reads only: cheap, and they catch most unreadable files early
            sizes[entry.index] = read_size(entry.path)
        except ImageReadError as exc:
            unreadable.append((entry, str(exc)))
    unreadable = [(entry, reason) for entry, reason in unreadable if entry.index % num_shards == shard]
    # Batches are planned over the whole data set and then dealt to the shards, so every image is
    # computed in the same batch however the job is sharded or resumed: the outputs are identical.
    batches = source.plan(entries, sizes)[shard::num_shards]
    planned = sum(map(len, batches)) + len(unreadable)

    with PartLock(final_part):
        if num_shards == 1:
            check_can_write(out, output.overwrite)  # again: another run may have finished meanwhile
        check_part_state(final_part, progress_part, output, current, f"{shard}/{num_shards}")
        write_subset_gt(output, subset)
        if output.overwrite:
            final_part.unlink(missing_ok=True)
        done: set[int] = set()
        if progress_part.exists() and not output.overwrite:
            scan = scan_part(progress_part, finished=False)
            if scan.offsets:
                with open(progress_part, "rb+") as f:
                    f.truncate(scan.good_end)  # a line torn by a kill is redone
                done = {index for index, _ in scan.offsets}
                recorded = scan.header.get("planned_images") if scan.header else None
                if recorded not in (None, planned):
                    raise UserError(f"{progress_part} was planned for {recorded} images of this shard, but the "
                                    f"image set now gives {planned}: it changed; --overwrite to start again")
        if not done:
            with open(progress_part, "w") as f:
                f.write(json.dumps({"kind": "header", "settings": settings, "fingerprint": current,
                                    "planned_images": planned}) + "\n")
        batches = [b for b in batches if any(index not in done for index in b)]
        with open(progress_part, "a") as part:
            writer = PartWriter(part, done, stats)
            for entry, reason in unreadable:
                writer.skip(entry, reason)
            if batches:
                source.run(batches, writer)
        stats.seconds["total"] = time.perf_counter() - start
        if stats.skipped:
            print(f"warning: skipped {stats.skipped} unreadable image(s); they are listed under 'skipped_images'",
                  file=sys.stderr)

        progress_part.rename(final_part)
        if num_shards == 1:
            images, skipped = assemble([final_part], out, settings, current)
            save_config(settings, out.with_suffix(".config.yaml"))
            shutil.rmtree(parts_dir(out))  # the lock file too: it is held until the end
            print(f"wrote {images} images ({skipped} skipped) to {out}")
        else:
            print(f"shard {shard}/{num_shards} done: {final_part}; run with --merge once every shard is done")
    if output.vis_dir and Path(output.vis_dir).is_dir():
        write_gallery(Path(output.vis_dir), settings)
    return stats


def run(job: MaskJob, make_source: Callable[[MaskJob], MaskSource]) -> RunStats:
    """`generate`, or under `torchrun` one shard per rank (the job's copy with the rank's shard and device)
    followed by a merge on rank 0."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return generate(job, make_source)
    from utils.distributed import barrier, cleanup, init_distributed

    info = init_distributed(job.device)
    output = job.output
    if output.shard != "0/1":
        raise UserError("--shard is set by torchrun (one shard per rank); leave it out")
    if Path(output.pred_json_path).exists() and not output.overwrite:
        raise UserError(f"output {output.pred_json_path} already exists; pass --overwrite to replace it")
    rank_job = replace(job, output=replace(output, shard=f"{info.rank}/{info.world_size}"),
                       device=str(info.device) if info.device.type == "cuda" else job.device)
    try:
        stats = generate(rank_job, make_source)
        barrier()
        if info.is_main:
            merge(rank_job.output)
            shutil.rmtree(parts_dir(Path(output.pred_json_path)))
        barrier()
    finally:
        cleanup()
    return stats
