"""The shared fail-safe mechanisms, table-driven across the converted CLIs: numeric ranges, devices and worker
counts (utils/cli.py), outputs that cannot be written or already exist, and file permissions under the umask."""
from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import convert_voc
import eval_corloc
import eval_instances
import gen_pa_masks
from detectron2_train import make_split, train_net
from segmentation import crf, eval_cluster, gen_segmentation, linear_finetune, train_plus_crf
from segmentation import train as seg_train
from utils import cluster
from tests.cli_helpers import error_line, run_main
from utils.cli import add_device_arg, add_num_workers_arg, check_outputs, float_range, int_range
from utils.coco_io import atomic_path, write_json, write_text
from utils.errors import UserError

# ----------------------------------------------------------------------------- argparse types


def _parse(add, argv):
    parser = argparse.ArgumentParser(prog="prog")
    add(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("arg_type, text, expected", [
    (int_range(1), "3", 3),
    (int_range(1), "1", 1),
    (int_range(1), "0", "0 is not >= 1"),
    (int_range(1), "-1", "-1 is not >= 1"),
    (int_range(1), "2.5", "'2.5' is not an integer"),
    (int_range(0, 10), "11", "11 is not in [0, 10]"),
    (int_range(None, 5), "6", "6 is not <= 5"),
    (float_range(0.0, 1.0), "1", 1.0),
    (float_range(0.0, 1.0), "0", 0.0),
    (float_range(0.0, 1.0), "2", "2 is not in [0, 1]"),
    (float_range(0.0, 1.0), "nan", "'nan' is not a finite number"),
    (float_range(0.0, 1.0), "inf", "'inf' is not a finite number"),
    (float_range(0.0, 1.0), "x", "'x' is not a number"),
    (float_range(0.0, 1.0, min_inclusive=False), "0", "0 is not in (0, 1]"),
    (float_range(0.0, 1.0, min_inclusive=False, max_inclusive=False), "1", "1 is not in (0, 1)"),
    (float_range(0.0), "-0.5", "-0.5 is not >= 0"),
])
def test_numeric_ranges(arg_type, text, expected, capsys):
    add = lambda p: p.add_argument("--x", type=arg_type)  # noqa: E731
    if isinstance(expected, str):
        with pytest.raises(SystemExit) as caught:
            _parse(add, ["--x", text])
        assert caught.value.code == 2
        assert error_line(capsys.readouterr().err) == f"prog: error: argument --x: {expected}"
    else:
        value = _parse(add, ["--x", text]).x
        assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("argv, expected", [
    ([], "auto"),
    (["--device", "cpu"], "cpu"),
    (["--device", "CPU"], "cpu"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device; use auto (CUDA if available, else CPU), cpu, "
                          "cuda or cuda:N"),
    (["--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
    (["--num_workers", "-1"], "argument --num_workers: -1 is not >= 0"),
    (["--num_workers", "0"], 0),
])
def test_device_and_num_workers(argv, expected, capsys):
    def add(parser):
        add_device_arg(parser)
        add_num_workers_arg(parser, 2)

    if isinstance(expected, str) and expected.startswith("argument"):
        with pytest.raises(SystemExit) as caught:
            _parse(add, argv)
        assert caught.value.code == 2 and error_line(capsys.readouterr().err).startswith(f"prog: error: {expected}")
    else:
        args = _parse(add, argv)
        assert (args.num_workers if argv and argv[0] == "--num_workers" else args.device) == expected


def test_cuda_without_a_gpu_is_one_error_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        _parse(add_device_arg, ["--device", "cuda:0"])
    assert error_line(capsys.readouterr().err) == ("prog: error: argument --device: cuda:0 was asked for but no CUDA "
                                                   "GPU is available; use cpu or auto")


# ----------------------------------------------------------------------------- every command line, one table

MISSING = "/nonexistent/input.json"
REPO = Path(__file__).resolve().parents[1]
SEG_TINY = str(REPO / "configs/segmentation/tiny_test.yml")
RCNN_TINY = str(REPO / "configs/detectron2/tiny_test.yaml")


@dataclass
class Cli:
    """One entry point: arguments that pass the parser but name missing inputs (`{tmp}` is the test's folder),
    its output (flag, file or folder; None: it writes nothing), an out-of-range flag with argparse's message,
    and its device and worker-count flags (None where it has none)."""

    name: str
    main: Callable
    argv: list[str]
    output: tuple[str, str] | None
    out_of_range: tuple[list[str], str] | None
    device: bool = False
    workers: tuple[str, str] | None = None  # (flag, message for -1)


NUM_WORKERS = ("--num_workers", "argument --num_workers: -1 is not >= 0")
PROCESSES = ("--workers", "argument --workers: -1 is not >= 1")
CLIS = [
    Cli("eval_instances", eval_instances.main, ["--input_file", MISSING, "--gt_file", MISSING], ("--out_json", "file"),
        (["--max_dets", "0"], "argument --max_dets: 0 is not >= 1")),
    Cli("eval_corloc", eval_corloc.main, ["--input_file", MISSING, "--gt_file", MISSING], ("--out_json", "file"),
        (["--iou_threshold", "nan"], "argument --iou_threshold: 'nan' is not a finite number")),
    Cli("convert_voc", convert_voc.main, ["--voc_root", "/nonexistent/VOC2012"], ("--out_file", "file"), None),
    Cli("cluster", cluster.main, ["--input_file", MISSING, "--image_root", "/nonexistent"], ("--output_file", "file"),
        (["--trials", "0"], "argument --trials: 0 is not >= 1"), device=True, workers=NUM_WORKERS),
    Cli("cluster --metrics_json", cluster.main, ["--input_file", MISSING, "--image_root", "/nonexistent",
                                                 "--output_file", "{tmp}/labelled.json"], ("--metrics_json", "file"),
        None),
    Cli("gen_pa_masks", gen_pa_masks.main, ["--dataset", "folder", "--dataset_root", "/nonexistent", "--affinity",
                                            "oracle", "--gt_json", MISSING], ("--pred_json_path", "file"),
        (["--max_images", "-1"], "argument --max_images: -1 is not >= 0"), device=True, workers=NUM_WORKERS),
    Cli("gen_pa_masks --topk", gen_pa_masks.main, ["--dataset", "folder", "--dataset_root", "/nonexistent",
                                                   "--affinity", "oracle", "--gt_json", MISSING, "--pred_json_path",
                                                   "{tmp}/out.json"], None, (["--topk", "0"], "argument --topk: 0 is not >= 1")),
    Cli("train_net", train_net.main, ["--config", RCNN_TINY, "--train_json", MISSING, "--train_root", "/nonexistent",
                                      "--output_dir", "{tmp}/out"], ("--output_dir", "folder"),
        (["--score_thresh", "nan"], "argument --score_thresh: 'nan' is not a finite number"), device=True,
        workers=NUM_WORKERS),
    Cli("train_net --results", train_net.main, ["--config", RCNN_TINY, "--eval_only", "--weights", MISSING,
                                                "--test_json", MISSING, "--test_root", "/nonexistent"],
        ("--results", "file"), (["--rounds", "0"], "argument --rounds: 0 is not >= 1")),
    Cli("make_split", make_split.main, ["--gt_file", MISSING], ("--out_dir", "folder"),
        (["--num_a", "0"], "argument --num_a: 0 is not >= 1")),
    Cli("gen_segmentation", gen_segmentation.main, ["--results", MISSING, "--dataset", MISSING, "--out_dir", "{tmp}/l"],
        ("--list", "file"), (["--threshold", "2"], "argument --threshold: 2 is not in [0, 1]")),
    Cli("gen_segmentation --out_dir", gen_segmentation.main, ["--results", MISSING, "--dataset", MISSING],
        ("--out_dir", "folder"), None),
    Cli("segmentation/train", seg_train.main, ["--config", SEG_TINY, "--output_dir", "{tmp}/out"],
        ("--output_dir", "folder"), None, device=True),
    Cli("train_plus_crf", train_plus_crf.main, ["--config", SEG_TINY, "--output_dir", "{tmp}/out"],
        ("--output_dir", "folder"), (["--rounds", "-1"], "argument --rounds: -1 is not >= 0"), device=True,
        workers=PROCESSES),
    Cli("linear_finetune", linear_finetune.main, ["--config_exp", str(REPO / "configs/segmentation/tiny_linear_voc.yml"),
                                                  "--set", "output_dir={tmp}/out"], ("--set output_dir=", "folder"),
        (["--workers", "0"], "argument --workers: 0 is not >= 1"), device=True, workers=PROCESSES),
    Cli("eval_cluster", eval_cluster.main, ["--config", SEG_TINY, "--model_path", MISSING], ("--output", "file"),
        (["--num_clusters", "0"], "argument --num_clusters: 0 is not >= 1"), device=True),
    Cli("crf", crf.main, ["--image_dir", "/nonexistent", "--mask_dir", "/nonexistent"], ("--out_dir", "folder"),
        (["--gt_prob", "1"], "argument --gt_prob: 1 is not in (0, 1)"), workers=PROCESSES),
    # summarize.py writes nothing and takes no number, device or worker count: only its inputs are checked.
]


def _run(cli: Cli, tmp_path: Path, extra: list[str]) -> tuple[int, str, str]:
    return run_main(cli.main, [a.replace("{tmp}", str(tmp_path)) for a in cli.argv] + extra)


def _refused(cli: Cli, tmp_path: Path, extra: list[str], expected: str, exact: bool = False) -> None:
    """Exit 2, nothing on stdout, one error line (`expected`, or holding it), and no file or folder created."""
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = _run(cli, tmp_path, extra)
    assert code == 2 and stdout == "", (code, stdout, stderr)
    line = error_line(stderr)
    assert (line.startswith(expected) if exact else expected in line), line
    assert sorted(tmp_path.rglob("*")) == before


def _ids(items):
    return [c.name for c in items]


@pytest.mark.parametrize("cli", [c for c in CLIS if c.device], ids=_ids([c for c in CLIS if c.device]))
def test_bad_device(cli, tmp_path):
    _refused(cli, tmp_path, ["--device", "tpu"], "argument --device: 'tpu' is not a device; use auto (CUDA if "
                                                 "available, else CPU), cpu, cuda or cuda:N")


@pytest.mark.parametrize("cli", [c for c in CLIS if c.device], ids=_ids([c for c in CLIS if c.device]))
def test_cuda_without_a_gpu(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _refused(cli, tmp_path, ["--device", "cuda"], "argument --device: cuda was asked for but no CUDA GPU is available")


@pytest.mark.parametrize("cli", [c for c in CLIS if c.workers], ids=_ids([c for c in CLIS if c.workers]))
def test_negative_worker_count(cli, tmp_path):
    _refused(cli, tmp_path, [cli.workers[0], "-1"], cli.workers[1])


@pytest.mark.parametrize("cli", [c for c in CLIS if c.out_of_range], ids=_ids([c for c in CLIS if c.out_of_range]))
def test_out_of_range_flag(cli, tmp_path):
    _refused(cli, tmp_path, cli.out_of_range[0], cli.out_of_range[1])


def _target(tmp_path: Path, case: str, kind: str) -> tuple[str, str]:
    """(an output path that cannot be written, the start of the error line it gives)."""
    what = "output folder" if kind == "folder" else "output"
    if case == "under /proc":
        target = "/proc/maskdistill_probe/out"
        return target, f"error: cannot write {what} {target}: no file can be created in /proc ("
    if case == "parent is a file":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        return str(blocker / "out"), f"error: cannot write {what} {blocker / 'out'}: {blocker} is a file, not a folder"
    if case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder / "out"), f"error: cannot write {what} {folder / 'out'}: no file can be created in {folder} " \
                                    f"(Permission denied)"
    if case == "output is a folder":  # files only
        folder = tmp_path / "a_folder"
        folder.mkdir()
        return str(folder), f"error: output {folder} is a folder, not a file"
    raise ValueError(case)


OUTPUT_CASES = [(cli, case) for cli in CLIS if cli.output
                for case in ("under /proc", "parent is a file", "read-only folder", "output is a folder")
                if case != "output is a folder" or cli.output[1] == "file"]


@pytest.mark.parametrize("cli, case", OUTPUT_CASES, ids=[f"{c.name}-{case}" for c, case in OUTPUT_CASES])
def test_unwritable_output_is_one_error_line_before_any_work(cli, case, tmp_path):
    target, message = _target(tmp_path, case, cli.output[1])
    flag = cli.output[0]
    extra = ["--set", f"output_dir={target}"] if flag == "--set output_dir=" else [flag, target]
    try:
        _refused(cli, tmp_path, extra, message, exact=True)
    finally:
        if case == "read-only folder":
            (tmp_path / "ro").chmod(0o755)


EXISTING = [c for c in CLIS if c.output and c.output[1] == "file" and c.name not in ("gen_segmentation",)]


@pytest.mark.parametrize("cli", EXISTING, ids=_ids(EXISTING))
def test_existing_output_needs_overwrite(tmp_path, cli):
    existing = tmp_path / "out.json"
    existing.write_text("keep me")
    _refused(cli, tmp_path, [cli.output[0], str(existing)],
             f"error: output {existing} already exists; pass --overwrite to replace it", exact=True)
    assert existing.read_text() == "keep me"
    code, _, stderr = _run(cli, tmp_path, [cli.output[0], str(existing), "--overwrite"])
    assert code == 2 and "already exists" not in stderr  # passes the output check, then fails on the missing input
    assert existing.read_text() == "keep me"


def test_make_split_keeps_existing_lists(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": [
        {"id": i, "name": n} for i, n in [(1, "person"), (2, "zebra"), (3, "bus")]]}))
    out = tmp_path / "splits"
    assert run_main(make_split.main, ["--gt_file", str(gt), "--out_dir", str(out)])[0] == 0
    assert (out / "A.txt").read_text() == "1  # person\n3  # bus\n" and (out / "B.txt").read_text() == "2  # zebra\n"
    (out / "B.txt").write_text("keep me")
    code, _, stderr = run_main(make_split.main, ["--gt_file", str(gt), "--out_dir", str(out), "--split",
                                                 "nonvoc_to_voc"])
    assert code == 2 and error_line(stderr) == (f"error: output {out / 'A.txt'} already exists; pass --overwrite "
                                                f"to replace it")
    assert (out / "A.txt").read_text() == "1  # person\n3  # bus\n" and (out / "B.txt").read_text() == "keep me"
    code, _, _ = run_main(make_split.main, ["--gt_file", str(gt), "--out_dir", str(out), "--split", "nonvoc_to_voc",
                                            "--overwrite"])
    assert code == 0 and (out / "A.txt").read_text() == "2  # zebra\n"


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.txt", "x\n")
        with open(tmp_path / "plain.txt", "w") as f:  # what every tool users know does
            f.write("x")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.json": expected, "b.txt": expected, "plain.txt": expected}


def test_replacing_a_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"x": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError):  # a failed block leaves the old file and no temporary file
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert json.loads(path.read_text()) == {"x": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
