"""utils/lock.py: one writer per output folder. A second pipeline, trainer or gallery writing into a folder another
run holds is refused with one line naming the holder's pid; the lock goes with its holder, a kill included."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from tests.cli_helpers import error_line, run_main
from utils.errors import UserError
from utils.lock import LOCK_FILE, folder_lock

REPO = Path(__file__).resolve().parents[1]


def refusal(folder: Path, pid: int, flag: str = "--out") -> str:
    return f"{folder} is in use by another run (pid {pid}); wait for it or choose another {flag}"


def test_two_holders_conflict_even_in_one_process(tmp_path):
    out = tmp_path / "out"
    with folder_lock(out, "--out"):
        assert (out / LOCK_FILE).read_text() == str(os.getpid())
        with pytest.raises(UserError) as refused:
            folder_lock(out, "--out").acquire()
        assert str(refused.value) == refusal(out, os.getpid())
    assert not out.exists()  # made by the lock and left empty: removed with the lock file
    out.mkdir()
    (out / "kept.txt").write_text("x")
    with folder_lock(out, "--out"):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]  # nothing of the lock stays in the outputs


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out until it is killed."""
    out = tmp_path / "out"
    code = ("import sys, time; from utils.lock import folder_lock; lock = folder_lock(sys.argv[1], '--out').acquire(); "
            "print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield out, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_second_pipeline_is_refused_and_a_killed_holder_lets_go(holder, tmp_path):
    from PIL import Image

    out, process = holder
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24)).save(images / "a.jpg")  # a valid run: only the lock refuses it, before any stage
    code, _, stderr = run_main(pipeline.main, ["--images", str(images), "--out", str(out), "--weights", "random",
                                               "--num_classes", "1"])
    assert code == 2 and error_line(stderr) == "error: " + refusal(out, process.pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    process.send_signal(signal.SIGKILL)
    process.wait()
    with folder_lock(out, "--out"):  # the kernel released the killed holder's lock
        pass


def test_a_second_trainer_is_refused_until_the_first_is_done(holder):
    from torch import nn

    from utils.distributed import DistInfo
    from utils.fingerprint import fingerprint
    from utils.training import LoopSettings, TrainingRun

    out, process = holder

    def training_run() -> TrainingRun:  # no optimizer: prepare never uses it without a checkpoint to resume from
        return TrainingRun(out, nn.Linear(2, 1), None, None, LoopSettings(max_iter=1), DistInfo(), config={},
                           fingerprint=fingerprint("toy", {}))

    with pytest.raises(UserError) as refused:
        training_run().prepare(resume=False, overwrite=False)
    assert str(refused.value) == refusal(out, process.pid, "--output_dir")
    process.kill()
    process.wait()
    first = training_run()
    first.prepare(resume=False, overwrite=False)
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # held from prepare until train ends
        training_run().prepare(resume=False, overwrite=True)
    first.release()  # what train does when it ends (tests/test_training_toolkit.py trains, then resumes)
    assert training_run().prepare(resume=True, overwrite=False) == 0


def test_a_second_gallery_is_refused_before_it_writes(holder, tmp_path):
    from PIL import Image

    from distill.gallery import build_gallery

    out, process = holder
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "a.png")
    masks = tmp_path / "masks.json"
    masks.write_text('{"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 6}], "annotations": [], '
                     '"categories": [{"id": 1, "name": "object"}]}')
    with pytest.raises(UserError) as refused:
        build_gallery(out, tmp_path / "images", [str(masks)])
    assert str(refused.value) == refusal(out, process.pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
