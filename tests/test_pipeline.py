"""pipeline.py end to end on tiny_coco with the tiny configs (the README's quick start), its rerun, and a
changed setting that reruns from the step it affects. One module-scoped run serves every test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline
from orchestrate.pipeline import run_pipeline, settings_from_args
from tests.cli_helpers import documented_argv, error_line, run_main
from utils.steps import Step

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO.parent / "shared" / "data" / "tiny_coco"
STAGES = ["masks", "cluster", "maskrcnn", "semantic", "deeplab", "eval"]
# The README's quick start, word for word (tests/test_docs_commands.py checks that the README still says it).
README_QUICK_START = ("python pipeline.py --images ../shared/data/tiny_coco/val2017 --out OUT "
                      "--gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --tiny")


def quick_start_argv(out: Path) -> list[str]:
    return documented_argv(README_QUICK_START, {"OUT": str(out)})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    if not TINY_COCO.exists():
        pytest.skip(f"real test data not present: {TINY_COCO}")
    out = tmp_path_factory.mktemp("pipeline") / "out"
    assert pipeline.main(quick_start_argv(out)) == 0
    return out


@pytest.mark.slow
def test_quick_start_writes_the_report_with_its_metrics(first_run):
    for stage in STAGES:
        assert json.loads((first_run / stage / "step.json").read_text())["done"] is True
    rows = json.loads((first_run / "eval" / "metrics.json").read_text())
    metrics = {row["metric"]: row for row in rows}
    expected = ["maskdistill masks mask AP", "maskdistill masks box AP", "maskdistill masks CorLoc",
                "clustering ACC", "clustering NMI", "Mask R-CNN round 2 mask AP",
                "DeepLab mIoU (K-means on its pixel embeddings, Hungarian-matched)"]
    assert all(name in metrics for name in expected), sorted(metrics)
    assert metrics["maskdistill masks mask AP"]["against"] == (
        "instances_val2017.json (50 images, 382 objects, class-agnostic)")
    assert metrics["maskdistill masks CorLoc"]["value"] == json.loads(
        (first_run / "eval" / "corloc.json").read_text())["CorLoc"]
    # the GT-free agreement of the last round with what it trained on
    own = [row for row in rows if "its own training pseudo-labels" in row["against"]]
    assert own and own[0]["against"].startswith("its own training pseudo-labels (round2/pseudo_labels.json")
    page = (first_run / "report.html").read_text()
    assert "<a href='masks/vis/index.html'>masks gallery</a>" in page
    for row in rows:
        assert row["against"].replace("<", "&lt;").replace(">", "&gt;") in page
    assert all(f"<td>{stage}</td><td>ran (new)</td>" in page for stage in STAGES)
    # the stages' outputs where the steps say
    assert (first_run / "masks" / "masks.json").is_file() and (first_run / "cluster" / "labelled.json").is_file()
    assert (first_run / "maskrcnn" / "round2" / "train_results.json").is_file()
    listed = (first_run / "semantic" / "train.txt").read_text().split()
    assert listed and all((first_run / "semantic" / "labels" / f"{name}.png").is_file() for name in listed)
    assert (first_run / "deeplab" / "round1" / "model_final.pth").is_file()


@pytest.mark.slow
def test_rerun_skips_every_finished_step(first_run):
    args = pipeline.build_parser().parse_args(quick_start_argv(first_run))
    records = run_pipeline(settings_from_args(args))
    assert [(r.name, r.status) for r in records] == [(stage, "skipped") for stage in STAGES]
    assert "skipped (done before)" in (first_run / "report.html").read_text()


@pytest.mark.slow
def test_changed_setting_reruns_from_the_affected_step(first_run):
    args = pipeline.build_parser().parse_args(quick_start_argv(first_run) + ["--crf_rounds", "0"])
    code, _, stderr = run_main(pipeline.main, quick_start_argv(first_run) + ["--crf_rounds", "0"])
    assert code == 2 and error_line(stderr) == (
        f"error: step deeplab in {first_run / 'deeplab'}: it was made with settings.crf_rounds=1, not 0; use the "
        "same settings, or --overwrite to run it again")
    assert (first_run / "deeplab" / "round1").exists()  # refused: nothing deleted
    records = run_pipeline(settings_from_args(args), overwrite=True)
    assert [(r.name, r.status) for r in records] == [
        ("masks", "skipped"), ("cluster", "skipped"), ("maskrcnn", "skipped"), ("semantic", "skipped"),
        ("deeplab", "ran"), ("eval", "ran")]
    assert records[4].reason == "it was made with settings.crf_rounds=1, not 0"
    assert not (first_run / "deeplab" / "round1").exists()  # the old rounds are gone, not mixed in


def test_bad_input_stops_before_any_file(tmp_path):
    code, _, stderr = run_main(pipeline.main, ["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2 and error_line(stderr) == f"error: --images {tmp_path / 'missing'}: not a folder"
    assert not (tmp_path / "out").exists()


def fake_stages(calls: list[str]):
    """Two cheap stages in place of the real ones: the masks stage's settings as build_steps makes them."""
    from orchestrate.pipeline import build_steps

    def steps(s):
        real = build_steps(s)[0]
        return [Step("masks", real.settings, lambda folder, results: calls.append("masks") or {}),
                Step("eval", {}, lambda folder, results: calls.append("eval") or {"metrics": []}, inputs=("masks",))]

    return steps


def test_weights_changed_in_place_are_refused_then_rerun_with_overwrite(tmp_path, monkeypatch):
    """--weights counts by its content: the same path with other bytes is a changed setting; pipeline.py names
    its own --overwrite, and with it reruns the masks stage and what reads it."""
    from orchestrate import pipeline as orchestration

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not decoded by the fake stages")
    weights = tmp_path / "dino.pth"
    weights.write_bytes(b"first weights")
    calls: list[str] = []
    monkeypatch.setattr(orchestration, "build_steps", fake_stages(calls))
    argv = ["--images", str(images), "--out", str(tmp_path / "out"), "--weights", str(weights)]
    assert pipeline.main(argv) == 0 and calls == ["masks", "eval"]
    assert pipeline.main(argv) == 0 and calls == ["masks", "eval"]  # skipped: same settings
    weights.write_bytes(b"other weights")
    code, _, stderr = run_main(pipeline.main, argv)
    assert code == 2 and error_line(stderr).startswith(
        f"error: step masks in {tmp_path / 'out' / 'masks'}: it was made with settings.weights={weights} (sha256 ")
    assert error_line(stderr).endswith("; use the same settings, or --overwrite to run it again")
    assert calls == ["masks", "eval"]
    assert pipeline.main([*argv, "--overwrite"]) == 0 and calls == ["masks", "eval"] * 2
