"""The pipeline's report: OUT/report.html and OUT/report.json (utils/report.py) from the step records, with
the galleries linked and a banner when the numbers come from `--tiny` or random weights."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from orchestrate.evaluate import GALLERY
from utils.report import write_report
from utils.steps import StepRecord

if TYPE_CHECKING:
    from orchestrate.settings import PipelineSettings


def plumbing_only(s: PipelineSettings) -> str | None:
    """Why the run's numbers mean nothing (for the banner), or None."""
    if s.tiny:
        weights = "random weights" if s.weights in (None, "random") else f"--weights {s.weights}"
        return f"--tiny: tiny configs, {weights} and a few iterations per stage"
    if s.weights == "random":
        return "--weights random: the discovery backbone has random weights"
    return None


def write_pipeline_report(s: PipelineSettings, records: Sequence[StepRecord]) -> Path:
    """Write OUT/report.html and OUT/report.json; returns the page's path."""
    evaluation = next(r.result for r in records if r.name == "eval")
    links = {"masks gallery": "masks/vis/index.html"}
    if evaluation.get("gallery"):
        links["masks and ground truth"] = f"eval/{GALLERY}/index.html"
    report = Path(s.out) / "report.html"
    write_report(report, records, title=f"MaskDistill pipeline: {s.images}", links=links,
                 metrics=evaluation["metrics"], banner=plumbing_only(s))
    return report
