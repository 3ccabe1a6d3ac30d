"""The one metric interface: every number the toolkit reports is a `MetricRow` (stage, metric, value,
against). Each metric family turns its result into rows next to where it is computed:

    coco_eval.ap_rows(result, label, against, stage)        mask/box AP and AP50 (pycocotools)
    corloc.corloc_row(result, label, against, stage)        CorLoc (LOST's protocol)
    metrics.clustering_rows(scores, against, stage)         clustering ACC/NMI/ARI
    metrics.miou_row(table, metric, against, stage)         mIoU of a confusion matrix

The pipeline's metrics.json and report (utils/report.py), and the benchmarks, read these rows. A new
metric is one module here (its computation and a function returning rows) plus its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class MetricRow:
    """One reported number: in percent, None where undefined (e.g. AP without any GT object)."""

    stage: str  # the pipeline stage whose output was measured (masks, cluster, maskrcnn, deeplab, ...)
    metric: str  # what was measured, e.g. "maskdistill masks mask AP50"
    value: float | None
    against: str  # what it was measured against, with the protocol's details

    def to_json(self) -> dict:
        # this key order is that of the pipeline's metrics.json, which stays byte-identical
        return {"metric": self.metric, "value": self.value, "against": self.against, "stage": self.stage}


def rows_to_json(rows: Iterable[MetricRow]) -> list[dict]:
    return [row.to_json() for row in rows]
