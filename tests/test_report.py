"""utils/report.py: report.html groups each stage's metrics under it with its time, readable settings and trained
models, escapes everything, shows the plumbing banner only when asked; report.json lists every metric."""
from __future__ import annotations

import json
from pathlib import Path

from utils.report import PLUMBING, readable, render_report, write_report
from utils.steps import StepRecord

ROWS = [{"metric": "lost masks mask AP", "value": 12.345, "against": "gt.json (50 images)", "stage": "masks"},
        {"metric": "Mask R-CNN <b>AP</b>", "value": None, "against": "IoU >= 0.5 & 'quotes'", "stage": "maskrcnn"},
        {"metric": "clustering ACC", "value": 40.0, "against": "gt.json classes", "stage": "cluster"},
        {"metric": "extra", "value": 1.0, "against": "elsewhere", "stage": "later"}]


def records(out: Path) -> list[StepRecord]:
    ckpt1, ckpt2 = str(out / "maskrcnn" / "round1" / "model_final.pth"), str(out / "maskrcnn" / "round2" / "model_final.pth")
    return [
        StepRecord("masks", "ran", out / "masks", {"gen_masks": ["--method", "lost", "--resize", "224"],
                                                   "tiny": True, "weights": None}, {"masks": "m.json"}, 12.25, "new"),
        StepRecord("cluster", "skipped", out / "cluster", {"num_classes": 5}, {}, 3.0),
        StepRecord("maskrcnn", "ran", out / "maskrcnn", {"overrides": ["solver.max_iter=8", "<script>"]},
                   {"rounds": [{"round": 1, "checkpoint": ckpt1}, {"round": 2, "checkpoint": ckpt2}],
                    "checkpoint": ckpt2}, 100.0, "new"),
    ]


def section(page: str, stage: str) -> str:
    """The HTML of one stage's section: from its heading to the next one."""
    start = page.index(f"<h2 id='stage-{stage}'>")
    end = page.find("<h2", start + 1)
    return page[start:] if end < 0 else page[start:end]


def test_each_stage_shows_its_own_metrics_time_and_readable_settings(tmp_path):
    page = render_report(records(tmp_path), "run", metrics=ROWS, report_dir=tmp_path)
    masks, cluster, maskrcnn = (section(page, s) for s in ("masks", "cluster", "maskrcnn"))
    assert "lost masks mask AP" in masks and "12.35" in masks and "clustering ACC" not in masks
    assert "clustering ACC" in cluster and "lost masks" not in cluster and "skipped (done before), 3.0 s" in cluster
    assert "ran (new), 12.2 s" in masks  # its own time (12.25 rounds half to even)
    assert "<b>gen_masks</b>: --method lost --resize 224</li>" in masks and "<b>weights</b>: none" in masks
    assert "[" not in masks  # no argv JSON
    assert "n/a" in maskrcnn
    # a metric of a stage that is not in the chain comes last, under its own heading
    assert "extra" in section(page, "later") and page.index("stage-later") > page.index("stage-maskrcnn")
    assert "<td>masks</td><td>ran (new)</td>" in page and "Total time of the stages' runs: 115.2 s" in page


def test_trained_models_are_linked_relative_to_the_report_each_once(tmp_path):
    maskrcnn = section(render_report(records(tmp_path), "run", metrics=ROWS, report_dir=tmp_path), "maskrcnn")
    assert maskrcnn.count("<a href='maskrcnn/round1/model_final.pth'>") == 1
    assert maskrcnn.count("<a href='maskrcnn/round2/model_final.pth'>") == 1
    assert "model_final" not in section(render_report(records(tmp_path), "run", report_dir=tmp_path), "masks")


def test_everything_is_escaped(tmp_path):
    page = render_report(records(tmp_path), "<title>", links={"<g>": "a'b.html"}, metrics=ROWS,
                         banner="<tiny>", report_dir=tmp_path)
    for raw in ("<b>AP</b>", "<script>", "<title></title>", "<tiny>", "<g>", "a'b", "& 'quotes'"):
        assert raw not in page
    assert "Mask R-CNN &lt;b&gt;AP&lt;/b&gt;" in page and "IoU &gt;= 0.5 &amp; &#x27;quotes&#x27;" in page


def test_the_banner_only_when_the_numbers_mean_nothing(tmp_path):
    plain = render_report(records(tmp_path), "run", metrics=ROWS, report_dir=tmp_path)
    flagged = render_report(records(tmp_path), "run", metrics=ROWS, banner="--tiny", report_dir=tmp_path)
    assert PLUMBING not in plain and "class='banner'" not in plain
    assert f"<p class='banner'>--tiny: {PLUMBING}.</p>" in flagged
    assert PLUMBING == "these numbers check the plumbing and mean nothing"


def test_report_json_lists_every_metric_the_stage_times_and_the_models(tmp_path):
    write_report(tmp_path / "report.html", records(tmp_path), "run", links={"gallery": "g/index.html"},
                 metrics=ROWS, banner="--weights random")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["metrics"] == [{"stage": r["stage"], "metric": r["metric"], "value": r["value"],
                                "against": r["against"]} for r in ROWS]
    assert [(s["stage"], s["status"], s["seconds"]) for s in data["stages"]] == [
        ("masks", "ran", 12.25), ("cluster", "skipped", 3.0), ("maskrcnn", "ran", 100.0)]
    assert data["models"] == [{"stage": "maskrcnn", "path": "maskrcnn/round1/model_final.pth"},
                              {"stage": "maskrcnn", "path": "maskrcnn/round2/model_final.pth"}]
    assert data["banner"] == f"--weights random: {PLUMBING}" and data["links"] == {"gallery": "g/index.html"}
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    assert not list(tmp_path.glob("*.tmp*"))


def test_readable_settings():
    assert readable(["--a", 1, None]) == "--a 1 none"
    assert readable({"k": [1, 2], "j": {"x": True}}) == "k: 1 2, j: x: True"


def test_the_pipeline_report_flags_tiny_and_random_weights_and_links_the_gt_gallery(tmp_path):
    from orchestrate.settings import PipelineSettings
    from orchestrate.report import write_pipeline_report

    rows = [dict(r) for r in ROWS]
    chain = records(tmp_path) + [StepRecord("eval", "ran", tmp_path / "eval", {}, {"metrics": rows, "gallery": "g"}, 1.0)]
    for settings, banner in ((PipelineSettings("imgs", str(tmp_path), tiny=True), "--tiny"),
                             (PipelineSettings("imgs", str(tmp_path), weights="random"), "--weights random"),
                             (PipelineSettings("imgs", str(tmp_path), weights="dino"), None)):
        page = write_pipeline_report(settings, chain).read_text()
        data = json.loads((tmp_path / "report.json").read_text())
        assert (data["banner"] or "").startswith(banner or "") and bool(data["banner"]) == bool(banner)
        assert (PLUMBING in page) == bool(banner)
        assert data["metrics"] == [{k: r[k] for k in ("stage", "metric", "value", "against")} for r in rows]
        assert "<a href='eval/gallery/index.html'>masks and ground truth</a>" in page
    tiny_real = write_pipeline_report(PipelineSettings("imgs", str(tmp_path), tiny=True, weights="w.pth"), chain)
    assert "--tiny: tiny configs, --weights w.pth and a few iterations" in tiny_real.read_text()  # not "random"
    chain[-1].result.pop("gallery")  # without --gt_json: no GT gallery to link
    assert "masks and ground truth" not in write_pipeline_report(PipelineSettings("i", str(tmp_path)), chain).read_text()
