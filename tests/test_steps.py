"""utils/steps.py: resumable steps skip finished work and rerun from the first step a change affects;
utils/report.py renders them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils.errors import UserError
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

    # the scale changes: refused, naming the step and the difference, before anything runs or is deleted
    (tmp_path / "scaled" / "stale.txt").write_text("left by the old run")
    calls.clear()
    with pytest.raises(UserError, match=r"^step scaled in .*scaled: it was made with settings\.scale=2, not 3; use "
                                        r"the same settings, or --overwrite to run it again$"):
        run_steps(tmp_path, chain(calls, scale=3), log=lambda _: None)
    assert calls == [] and (tmp_path / "scaled" / "stale.txt").exists()

    # with overwrite: numbers is kept, scaled and everything downstream of it rerun
    records = run_steps(tmp_path, chain(calls, scale=3), log=lambda _: None, overwrite=True)
    assert calls == ["scaled", "summed"] and records[-1].result == {"sum": 19}
    assert [r.status for r in records] == ["skipped", "ran", "ran"]
    assert records[1].reason == "it was made with settings.scale=2, not 3"
    assert records[2].reason.startswith("it was made with inputs.scaled=")
    assert not (tmp_path / "scaled" / "stale.txt").exists()  # a changed step starts from an empty folder

    # only the last step's setting changes: only it reruns
    calls.clear()
    records = run_steps(tmp_path, chain(calls, scale=3, offset=0), log=lambda _: None, overwrite=True)
    assert calls == ["summed"] and records[-1].result == {"sum": 18}


def test_a_file_rewritten_in_place_counts_as_a_changed_setting(tmp_path):
    """A setting naming a file counts by its content: the same path with other bytes is refused."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"first")
    calls: list[str] = []

    def steps() -> list[Step]:
        return [Step("train", {"weights": str(weights)}, lambda folder, results: calls.append("train") or {})]

    run_steps(tmp_path / "out", steps(), log=lambda _: None)
    weights.write_bytes(b"other")
    with pytest.raises(UserError, match=rf"^step train in .*: it was made with settings\.weights={weights} \(sha256 "):
        run_steps(tmp_path / "out", steps(), log=lambda _: None)
    records = run_steps(tmp_path / "out", steps(), log=lambda _: None, overwrite=True)
    assert calls == ["train", "train"] and records[0].status == "ran"


def test_a_folder_without_a_marker_is_refused_not_deleted(tmp_path):
    (tmp_path / "numbers").mkdir()
    (tmp_path / "numbers" / "mine.txt").write_text("someone's work")
    with pytest.raises(UserError, match="step numbers in .*: it records no settings to compare"):
        run_steps(tmp_path, chain([]), log=lambda _: None)
    assert (tmp_path / "numbers" / "mine.txt").exists()


def test_a_step_whose_input_runs_again_starts_from_an_empty_folder(tmp_path):
    """Same settings, but what it reads was redone (an unfinished earlier step): it is stale, not resumed."""
    calls: list[str] = []
    run_steps(tmp_path, chain(calls), log=lambda _: None)
    marker = json.loads((tmp_path / "scaled" / MARKER).read_text())
    (tmp_path / "scaled" / MARKER).write_text(json.dumps({**marker, "done": False}))
    (tmp_path / "summed" / "old.txt").write_text("made from the old scaled")
    calls.clear()
    records = run_steps(tmp_path, chain(calls), log=lambda _: None)
    assert calls == ["scaled", "summed"] and [r.reason for r in records[1:]] == ["unfinished",
                                                                                "an input it reads runs again"]
    assert not (tmp_path / "summed" / "old.txt").exists()


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
