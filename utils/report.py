"""The report of a chain of steps (utils/steps.py): `report.html` and, next to it, `report.json`.

    write_report(Path("out/report.html"), records, title="...", links={"masks gallery": "masks/vis/index.html"},
                 metrics=[{"stage": "masks", "metric": "mask AP", "value": 12.3, "against": "instances_val2017.json"}],
                 banner="--tiny: tiny configs and random weights")

The page has a table of the stages (this run, time, folder), then one section per stage: its metrics
(rows of evaluation/rows.py as JSON: stage, metric, value in percent, what it was measured against), the
trained models it wrote (every `checkpoint` path in its result, linked), and its settings as a key: value
list. Metrics of a stage that is not in the chain come last. A `banner` (why the numbers mean nothing,
e.g. `--tiny` or random weights) is shown on top. report.json holds the same: every metric as
{stage, metric, value, against}, the stages with their times, the models and the banner. Everything
shown is HTML-escaped; links are relative to the report's folder.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from utils.coco_io import atomic_path, write_json
from utils.steps import StepRecord

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
         "ul.settings{font-size:90%;margin-top:0}ul.settings li{word-break:break-all}"
         ".banner{background:#c00;color:#fff;padding:0.6em 1em;font-weight:bold}")
PLUMBING = "these numbers check the plumbing and mean nothing"


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))


def readable(value: Any) -> str:
    """A setting as text: lists joined by spaces (argv reads as a command line), dicts as `key: value, ...`."""
    if isinstance(value, (list, tuple)):
        return " ".join(readable(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {readable(v)}" for k, v in value.items())
    return "none" if value is None else str(value)


def _checkpoints(result: Any) -> Iterator[str]:
    """Every `checkpoint` path in a step's result, at any depth, in order."""
    if isinstance(result, Mapping):
        for key, value in result.items():
            if key == "checkpoint" and isinstance(value, str):
                yield value
            else:
                yield from _checkpoints(value)
    elif isinstance(result, list):
        for item in result:
            yield from _checkpoints(item)


def trained_models(records: Sequence[StepRecord]) -> list[tuple[str, str]]:
    """(stage, checkpoint path) of every model the steps wrote, each path once."""
    seen: dict[str, str] = {}
    for record in records:
        for path in _checkpoints(record.result):
            seen.setdefault(path, record.name)
    return [(stage, path) for path, stage in seen.items()]


def link(path: str, report_dir: Path) -> str:
    """`path` relative to the report's folder: absolute, relative to the report's folder when it is there,
    else relative to the working directory."""
    target = Path(path)
    if not target.is_absolute() and (report_dir / target).exists():
        target = report_dir / target
    return Path(os.path.relpath(target.resolve(), report_dir.resolve())).as_posix()


def _status(record: StepRecord) -> str:
    if record.status != "ran":
        return "skipped (done before)"
    return "ran" + (f" ({record.reason})" if record.reason else "")


def _grouped(records: Sequence[StepRecord], metrics: Sequence[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """The metric rows under each stage, in the chain's order; rows of other stages last, by first appearance."""
    names = [r.name for r in records]
    others = list(dict.fromkeys(str(row["stage"]) for row in metrics if row["stage"] not in names))
    return [(name, [row for row in metrics if str(row["stage"]) == name]) for name in [*names, *others]]


def _metrics_table(rows: Sequence[Mapping]) -> str:
    esc = html.escape
    out = ["<table><tr><th>metric</th><th>value (%)</th><th>measured against</th></tr>"]
    out += [f"<tr><td>{esc(str(row['metric']))}</td><td>{_value(row['value'])}</td>"
            f"<td>{esc(str(row['against']))}</td></tr>" for row in rows]
    return "".join(out) + "</table>"


def render_report(records: Sequence[StepRecord], title: str, links: Mapping[str, str] | None = None,
                  metrics: Sequence[Mapping] = (), banner: str | None = None, report_dir: Path = Path(".")) -> str:
    """The report's HTML (`links` are relative to the report's folder, `report_dir`)."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    if banner:
        parts.append(f"<p class='banner'>{esc(banner)}: {PLUMBING}.</p>")
    if links:
        parts.append("<p>" + " · ".join(f"<a href='{esc(href)}'>{esc(name)}</a>" for name, href in links.items())
                     + "</p>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>this run</th><th>time (s)</th><th>output folder</th></tr>")
    for record in records:
        parts.append(f"<tr><td>{esc(record.name)}</td><td>{esc(_status(record))}</td><td>{record.seconds:.1f}</td>"
                     f"<td><a href='{esc(record.name)}/'>{esc(record.name)}/</a></td></tr>")
    parts.append(f"</table><p>Total time of the stages' runs: {sum(r.seconds for r in records):.1f} s.</p>")
    by_name = {r.name: r for r in records}
    models = trained_models(records)
    for name, rows in _grouped(records, metrics):
        record = by_name.get(name)
        parts.append(f"<h2 id='stage-{esc(name)}'>{esc(name)}</h2>")
        if record is not None:
            parts.append(f"<p>{esc(_status(record))}, {record.seconds:.1f} s</p>")
        stage_models = [path for stage, path in models if stage == name]
        if stage_models:
            parts.append("<p>Trained models: " + ", ".join(
                f"<a href='{esc(link(path, report_dir))}'>{esc(link(path, report_dir))}</a>" for path in stage_models)
                + "</p>")
        if rows:
            parts.append(_metrics_table(rows))
        if record is not None and record.settings:
            parts.append("<ul class='settings'>" + "".join(
                f"<li><b>{esc(str(key))}</b>: {esc(readable(value))}</li>" for key, value in record.settings.items())
                + "</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


def report_json(records: Sequence[StepRecord], title: str, links: Mapping[str, str] | None = None,
                metrics: Sequence[Mapping] = (), banner: str | None = None, report_dir: Path = Path(".")) -> dict:
    """report.json: every metric as {stage, metric, value, against}, the stages' times and the trained models."""
    return {"title": title, "banner": f"{banner}: {PLUMBING}" if banner else None,
            "metrics": [{key: row[key] for key in ("stage", "metric", "value", "against")} for row in metrics],
            "stages": [{"stage": r.name, "status": r.status, "reason": r.reason, "seconds": r.seconds,
                        "folder": f"{r.name}/"} for r in records],
            "models": [{"stage": stage, "path": link(path, report_dir)} for stage, path in trained_models(records)],
            "links": dict(links or {})}


def write_report(path: str | Path, records: Sequence[StepRecord], title: str, links: Mapping[str, str] | None = None,
                 metrics: Sequence[Mapping] = (), banner: str | None = None) -> None:
    """Write `render_report(...)` to `path` and `report_json(...)` to report.json beside it, each atomically."""
    path = Path(path)
    write_json(path.with_name("report.json"), report_json(records, title, links, metrics, banner, path.parent), indent=1)
    with atomic_path(path) as tmp:
        tmp.write_text(render_report(records, title, links, metrics, banner, path.parent), encoding="utf-8")
