"""utils/steps.py: resumable steps skip finished work and rerun from the first step a change affects;
utils/report.py renders them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.report import render_report
from utils.steps import MARKER, Step, run_steps


def chain(calls: list[str], scale: int = 2, offset: int = 1, fail_in: str | None = None) -> list[Step]:
    """numbers.json = [1, 2, 3]; scaled.json = x * scale; summed.json = sum(scaled) + offset."""

    def numbers(folder: Path, results: dict) -> dict:
        calls.append("numbers")
        (folder / "numbers.json").write_text("[1, 2, 3]")
        return {"path": str(folder / "numbers.json")}

    def scaled(folder: Path, results: dict) -> dict:
        calls.append("scaled")
        values = [v * scale for v in json.loads(Path(results["numbers"]["path"]).read_text())]
        (folder / "scaled.json").write_text(json.dumps(values))
        return {"path": str(folder / "scaled.json")}

    def summed(folder: Path, results: dict) -> dict:
        calls.append("summed")
        if fail_in == "summed":
            raise RuntimeError("interrupted")
        return {"sum": sum(json.loads(Path(results["scaled"]["path"]).read_text())) + offset}

    return [Step("numbers", {}, numbers), Step("scaled", {"scale": scale}, scaled, inputs=("numbers",)),
            Step("summed", {"offset": offset}, summed, inputs=("scaled",))]


def test_steps_run_skip_and_rerun_from_the_changed_one(tmp_path):
    calls: list[str] = []
    records = run_steps(tmp_path, chain(calls), log=lambda _: None)
    assert calls == ["numbers", "scaled", "summed"] and records[-1].result == {"sum": 13}
    assert [r.status for r in records] == ["ran"] * 3 and records[0].reason == "new"

    calls.clear()
    records = run_steps(tmp_path, chain(calls), log=lambda _: None)
    assert calls == [] and [r.status for r in records] == ["skipped"] * 3 and records[-1].result == {"sum": 13}

    # the scale changes: numbers is kept, scaled and everything downstream of it rerun
    (tmp_path / "scaled" / "stale.txt").write_text("left by the old run")
    calls.clear()
    records = run_steps(tmp_path, chain(calls, scale=3), log=lambda _: None)
    assert calls == ["scaled", "summed"] and records[-1].result == {"sum": 19}
    assert [r.status for r in records] == ["skipped", "ran", "ran"]
    assert records[1].reason == "it was made with settings.scale=2, not 3"
    assert records[2].reason.startswith("it was made with inputs.scaled=")
    assert not (tmp_path / "scaled" / "stale.txt").exists()  # a changed step starts from an empty folder

    # only the last step's setting changes: only it reruns
    calls.clear()
    records = run_steps(tmp_path, chain(calls, scale=3, offset=0), log=lambda _: None)
    assert calls == ["summed"] and records[-1].result == {"sum": 18}


def test_an_interrupted_step_runs_again_in_its_folder(tmp_path):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="interrupted"):
        run_steps(tmp_path, chain(calls, fail_in="summed"), log=lambda _: None)
    marker = json.loads((tmp_path / "summed" / MARKER).read_text())
    assert marker["done"] is False
    (tmp_path / "summed" / "partial.txt").write_text("kept: same settings, the job may resume from it")
    calls.clear()
    records = run_steps(tmp_path, chain(calls), log=lambda _: None)
    assert calls == ["summed"] and records[-1].reason == "unfinished"
    assert (tmp_path / "summed" / "partial.txt").exists()


def test_a_step_may_only_read_earlier_steps(tmp_path):
    steps = chain([])
    steps[1].inputs = ("summed",)
    with pytest.raises(ValueError, match="step 'scaled' reads 'summed', which does not run before it"):
        run_steps(tmp_path, steps, log=lambda _: None)


def test_report_lists_stages_settings_and_metrics_with_their_reference(tmp_path):
    records = run_steps(tmp_path, chain([]), log=lambda _: None)
    page = render_report(records, "run <1>", {"masks gallery": "masks/vis/index.html"},
                         [{"stage": "summed", "metric": "mask AP", "value": 12.345, "against": "gt.json (50 images)"},
                          {"stage": "summed", "metric": "CorLoc", "value": None, "against": "gt.json"}])
    assert "<title>run &lt;1&gt;</title>" in page
    assert "<a href='masks/vis/index.html'>masks gallery</a>" in page
    summed = page[page.index("<h2 id='stage-summed'>"):]  # the last stage's section
    assert "<tr><td>mask AP</td><td>12.35</td><td>gt.json (50 images)</td></tr>" in summed
    assert "<td>CorLoc</td><td>n/a</td>" in summed
    assert page.count("<td>ran (new)</td>") == 3 and "<li><b>scale</b>: 2</li>" in page
