"""The shared fail-safe mechanisms, table-driven across the converted CLIs: numeric ranges, devices and worker
counts (utils/cli.py), outputs that cannot be written or already exist, and file permissions under the umask."""
from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest

import convert_voc
import eval_corloc
import eval_instances
from segmentation import eval_cluster, gen_segmentation
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


# ----------------------------------------------------------------------------- flag ranges of the converted CLIs

MISSING = "/nonexistent/input.json"


@pytest.mark.parametrize("main, argv, message", [
    (eval_corloc.main, ["--input_file", MISSING, "--gt_file", MISSING, "--iou_threshold", "0"],
     "argument --iou_threshold: 0 is not in (0, 1]"),
    (eval_corloc.main, ["--input_file", MISSING, "--gt_file", MISSING, "--iou_threshold", "nan"],
     "argument --iou_threshold: 'nan' is not a finite number"),
    (eval_instances.main, ["--input_file", MISSING, "--gt_file", MISSING, "--iou_thresholds", "0.5", "1.5"],
     "argument --iou_thresholds: 1.5 is not in (0, 1)"),
    (gen_segmentation.main, ["--results", MISSING, "--dataset", MISSING, "--out_dir", "x", "--threshold", "2"],
     "argument --threshold: 2 is not in [0, 1]"),
    (eval_cluster.main, ["--config", MISSING, "--model_path", MISSING, "--num_clusters", "0"],
     "argument --num_clusters: 0 is not >= 1"),
    (eval_cluster.main, ["--config", MISSING, "--model_path", MISSING, "--max_fit_pixels", "-5"],
     "argument --max_fit_pixels: -5 is not >= 1"),
    (eval_cluster.main, ["--config", MISSING, "--model_path", MISSING, "--device", "tpu"],
     "argument --device: 'tpu' is not a device"),
])
def test_bad_flag_values_are_refused_by_the_parser(main, argv, message):
    code, stdout, stderr = run_main(main, argv)
    assert code == 2 and stdout == ""
    assert message in error_line(stderr)


# ----------------------------------------------------------------------------- unwritable and existing outputs

# (CLI, arguments before the output, output flag): inputs do not exist, so the run must stop at the output check.
FILE_OUTPUTS = [
    (eval_corloc.main, ["--input_file", MISSING, "--gt_file", MISSING], "--out_json"),
    (eval_instances.main, ["--input_file", MISSING, "--gt_file", MISSING], "--out_json"),
    (convert_voc.main, ["--voc_root", "/nonexistent/VOC2012"], "--out_file"),
    (eval_cluster.main, ["--config", MISSING, "--model_path", MISSING], "--output"),
    (gen_segmentation.main, ["--results", MISSING, "--dataset", MISSING, "--out_dir", "{tmp}/labels"], "--list"),
]


def _bad_targets(tmp_path: Path) -> dict:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {
        "under /proc": ("/proc/maskdistill_probe/out.json",
                        "cannot write output /proc/maskdistill_probe/out.json: no file can be created in /proc ("),
        "parent is a file": (str(blocker / "out.json"), f"cannot write output {blocker / 'out.json'}: {blocker} is a "
                                                        f"file, not a folder"),
        "output is a folder": (str(folder), f"output {folder} is a folder, not a file"),
    }


@pytest.mark.parametrize("case", ["under /proc", "parent is a file", "output is a folder"])
@pytest.mark.parametrize("main, argv, flag", FILE_OUTPUTS, ids=lambda v: getattr(v, "__module__", None) or "")
def test_unwritable_output_file_is_one_error_line_before_any_work(tmp_path, main, argv, flag, case):
    target, message = _bad_targets(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, stdout, stderr = run_main(main, argv + [flag, target])
    assert code == 2 and stdout == ""
    assert error_line(stderr) == f"error: {message}" or error_line(stderr).startswith(f"error: {message}")
    assert sorted(tmp_path.rglob("*")) == before  # nothing created (no output folder either)


def test_read_only_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        message = f"cannot write output {folder / 'x.json'}: no file can be created in {folder} \\(Permission denied\\)"
        with pytest.raises(UserError, match=message):
            check_outputs(folder / "x.json")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("case", ["under /proc", "parent is a file"])
def test_unwritable_output_folder_is_one_error_line(tmp_path, case):
    target = {"under /proc": "/proc/maskdistill_probe/labels", "parent is a file": str(tmp_path / "f" / "labels")}[case]
    (tmp_path / "f").write_text("")
    code, _, stderr = run_main(gen_segmentation.main, ["--results", MISSING, "--dataset", MISSING, "--out_dir", target])
    assert code == 2 and error_line(stderr).startswith(f"error: cannot write output folder {target}: ")


@pytest.mark.parametrize("main, argv, flag", [o for o in FILE_OUTPUTS if o[0] is not gen_segmentation.main],
                         ids=lambda v: getattr(v, "__module__", None) or "")
def test_existing_output_needs_overwrite(tmp_path, main, argv, flag):
    existing = tmp_path / "out.json"
    existing.write_text("keep me")
    code, _, stderr = run_main(main, argv + [flag, str(existing)])
    assert code == 2
    assert error_line(stderr) == f"error: output {existing} already exists; pass --overwrite to replace it"
    assert existing.read_text() == "keep me"
    code, _, stderr = run_main(main, argv + [flag, str(existing), "--overwrite"])
    assert code == 2 and "already exists" not in stderr  # passes the output check, then fails on the missing input


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
