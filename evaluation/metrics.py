"""Shared metrics: confusion-matrix mIoU, cluster-to-class matching (Hungarian / majority), ACC/NMI/ARI, and
their rows (evaluation/rows.py)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from evaluation.rows import MetricRow


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """`num_classes x num_classes` counts, rows = target class, columns = predicted class.

    Pixels whose target is `ignore_index` are skipped. A target or prediction outside
    [0, num_classes) raises ValueError, so a wrong label file never yields a silent number.
    """
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    target = np.asarray(target).reshape(-1).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels but target has {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    for name, values in (("target", target), ("prediction", pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} class id {int(values.max() if values.max() >= num_classes else values.min())} "
                             f"outside [0, {num_classes})")
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU over classes present in target or prediction, per-class IoU with NaN for absent classes)."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou)) if np.any(union > 0) else float("nan"), iou


def hungarian_match(pred: np.ndarray, target: np.ndarray, num_pred: int, num_target: int) -> dict[int, int]:
    """One-to-one cluster -> class map maximising agreement (scipy's linear_sum_assignment)."""
    counts = np.zeros((num_pred, num_target), dtype=np.int64)
    np.add.at(counts, (np.asarray(pred), np.asarray(target)), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def majority_match(pred: np.ndarray, target: np.ndarray, num_pred: int, num_target: int) -> dict[int, int]:
    """Many-to-one map for over-clustering: each cluster takes its most frequent class."""
    counts = np.zeros((num_pred, num_target), dtype=np.int64)
    np.add.at(counts, (np.asarray(pred), np.asarray(target)), 1)
    return {int(k): int(np.argmax(counts[k])) for k in range(num_pred)}


def cluster_scores(pred: np.ndarray, target: np.ndarray, num_pred: int, num_target: int) -> dict:
    """ACC (Hungarian if num_pred == num_target, else majority), NMI and ARI."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    pred, target = np.asarray(pred), np.asarray(target)
    match = hungarian_match if num_pred == num_target else majority_match
    mapping = match(pred, target, num_pred, num_target)
    remapped = np.array([mapping.get(int(p), -1) for p in pred])
    return {
        "ACC": float((remapped == target).mean()) if target.size else float("nan"),
        "NMI": float(normalized_mutual_info_score(target, pred)),
        "ARI": float(adjusted_rand_score(target, pred)),
        "mapping": mapping,
        "matching": "hungarian" if num_pred == num_target else "majority",
    }


def clustering_rows(scores: dict, against: str, stage: str = "cluster") -> list[MetricRow]:
    """"clustering ACC/NMI/ARI" rows of the scores present (in percent, as distill/cluster.py reports them),
    with the matching and the number of clusters (`matching`, `num_classes`) appended to `against`."""
    details = f"{against} ({scores.get('matching')} matching, {scores.get('num_classes')} clusters)"
    return [MetricRow(stage, f"clustering {name}", scores[name], details)
            for name in ("ACC", "NMI", "ARI") if name in scores]


def miou_row(table: dict, metric: str, against: str, stage: str) -> MetricRow:
    """The mIoU of an `iou_result`-style table (`mIoU` a fraction) as a row in percent."""
    return MetricRow(stage, metric, 100 * table["mIoU"], against)
