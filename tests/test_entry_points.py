"""Every entry point answers --help without importing torch (quick help, also on a login node)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every script with a command line (`if __name__ == "__main__"`), and a flag its --help must show.
ENTRY_POINTS = {
    "pipeline.py": "--gt_json",
    "gen_masks.py": "--pred_json_path",
    "gen_pa_masks.py": "--pred_json_path",
    "eval_instances.py": "--gt_file",
    "eval_corloc.py": "--gt_file",
    "convert_voc.py": "--help",
    "make_gallery.py": "--masks",
    "predict.py": "--weights",
    "utils/cluster.py": "--num_classes",
    "detectron2_train/train_net.py": "--rounds",
    "detectron2_train/train_affinity.py": "--config",
    "detectron2_train/make_split.py": "--help",
    "detectron2_train/summarize.py": "--help",
    "segmentation/gen_segmentation.py": "--keep_empty",
    "segmentation/train.py": "--config",
    "segmentation/train_plus_crf.py": "--rounds",
    "segmentation/crf.py": "--help",
    "segmentation/eval_cluster.py": "--model_path",
    "segmentation/linear_finetune.py": "--config_exp",
}


@pytest.fixture(scope="module")
def help_report() -> dict:
    """One interpreter runs every --help in turn (tests/helpers/script_probe.py) and reports, per script,
    its help text and whether torch was imported by then."""
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.script_probe", "help", json.dumps(list(ENTRY_POINTS))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_entry_point_is_listed():
    scripts = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")
               if not {".venv", "tests", "benchmarks", "env"} & set(p.parts) and "__main__" in p.read_text()}
    assert scripts == set(ENTRY_POINTS)


@pytest.mark.parametrize("script", list(ENTRY_POINTS))
def test_help_does_not_import_torch(help_report, script):
    entry = help_report[script]
    assert entry["exit"] == 0 and ENTRY_POINTS[script] in entry["help"]
    assert not entry["torch"], f"{script} --help imports torch"

