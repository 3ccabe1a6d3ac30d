"""An HTML report of a chain of steps (utils/steps.py): the stages, their settings and timings, and the
metrics with what each was measured against.

    write_report(Path("out/report.html"), records, title="...", links={"masks gallery": "masks/vis/index.html"},
                 metrics=[{"metric": "mask AP", "value": 12.3, "against": "instances_val2017.json", "stage": "masks"}])
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Sequence

from utils.coco_io import atomic_path
from utils.steps import StepRecord

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
         "pre{margin:0;font-size:85%;white-space:pre-wrap}")


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def render_report(records: Sequence[StepRecord], title: str, links: Mapping[str, str] | None = None,
                  metrics: Sequence[Mapping] = ()) -> str:
    """The report's HTML (links are relative to the report's folder)."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    if links:
        parts.append("<p>" + " · ".join(f"<a href='{esc(href)}'>{esc(name)}</a>" for name, href in links.items())
                     + "</p>")
    parts.append("<h2>Metrics</h2><table><tr><th>stage</th><th>metric</th><th>value (%)</th><th>measured against</th></tr>")
    for row in metrics:
        parts.append(f"<tr><td>{esc(str(row['stage']))}</td><td>{esc(str(row['metric']))}</td>"
                     f"<td>{_value(row['value'])}</td><td>{esc(str(row['against']))}</td></tr>")
    parts.append("</table><h2>Stages</h2><table><tr><th>stage</th><th>this run</th><th>time (s)</th>"
                 "<th>output folder</th><th>settings</th></tr>")
    for record in records:
        status = "ran" + (f" ({record.reason})" if record.reason else "") if record.status == "ran" else "skipped (done before)"
        settings = json.dumps(record.settings, indent=1, default=str)
        parts.append(f"<tr><td>{esc(record.name)}</td><td>{esc(status)}</td><td>{record.seconds:.1f}</td>"
                     f"<td><a href='{esc(record.name)}/'>{esc(record.name)}/</a></td>"
                     f"<td><pre>{esc(settings)}</pre></td></tr>")
    parts.append(f"</table><p>Total time of the stages' runs: {sum(r.seconds for r in records):.1f} s.</p>"
                 "</body></html>\n")
    return "".join(parts)


def write_report(path: str | Path, records: Sequence[StepRecord], title: str, links: Mapping[str, str] | None = None,
                 metrics: Sequence[Mapping] = ()) -> None:
    """Write `render_report(...)` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(render_report(records, title, links, metrics), encoding="utf-8")
