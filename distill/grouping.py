"""Class-agnostic object masks from a pairwise-affinity map: the grouping and ranking of GGN.

Wang, Feiszli, Wang, Malik, Tran. "Open-World Instance Segmentation: Exploiting Pseudo Ground
Truth From Learned Pairwise Affinity", CVPR 2022. The behaviour follows the grouping of the
authors' release (facebookresearch/Generic-Grouping, `pa_lib/`), rebuilt on scikit-image and
scipy. The input is a PA map (H x W in [0, 1]: how much a pixel agrees with its 8 neighbours,
see utils/affinity.py), from the PA predictor or from ground truth (`oracle_affinity`).

1. Over-segmentation: markers at the local maxima of PA (`peak_local_max` with a square
   footprint, touching maxima joined into one marker), watershed on -PA (8-connected).
2. Region graph: a region adjacency graph of the superpixels, each border weighted by its mean
   local boundary strength 1 - PA (`skimage.graph.rag_boundary`). Optional globalisation: the
   smallest generalised eigenvectors of the pixel affinity graph's Laplacian (scipy's sparse
   `eigsh`, shift-invert), solved in the space of vectors constant on superpixels, embed the
   regions (as gPb's spectral boundaries); the embedding distance of two neighbours is blended
   with their local border strength.
3. Hierarchy: the graph is merged weakest border first until one region is left (the
   agglomeration of `skimage.graph.merge_hierarchical`; a merged border keeps the
   length-weighted mean of its parts). Every region ever formed, initial or merged, is a candidate.
4. Filtering and ranking: candidates smaller than `min_area` or hugging the image border (more
   pixels on the image frame than `border_ratio` x their own contour) are dropped. The rank is
   the mean PA on the band around the candidate's contour (both sides, 4-connected) minus the
   mean PA inside it, lower is better (GGN's ranking method 3); the score (1 - rank) / 2 lies in
   [0, 1]. Greedy mask NMS at `nms_iou` keeps the best of overlapping candidates, top `topk` out.

Candidates are unions of superpixels, so every statistic (band and inside PA, contour length,
frame contact, IoU) is gathered once per superpixel boundary configuration and summed per
candidate with sparse products: thousands of candidates cost about as much as one.
Differences from the release: no orientation re-weighting of the boundaries; the eigenproblem is
reduced to the superpixels (the release solves it on every pixel, seconds per image) and gives
a distance per border rather than a boundary map per pixel; merged borders keep the
length-weighted mean instead of the plain mean of the two.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse
from scipy.sparse.linalg import eigsh
from skimage import graph as skgraph
from skimage.feature import peak_local_max
from skimage.segmentation import watershed
from threadpoolctl import threadpool_limits

from distill.visualize import save_overlay
from utils.affinity import instance_label_map, pairwise_affinity
from utils.coco_io import decode_segmentation, make_annotation
from utils.images import load_rgb


@dataclass(frozen=True)
class GroupingOptions:
    peak_radius: int = 10  # markers: local maxima of PA over a (2r + 1)^2 window (GGN: 20 x 20)
    globalization: float = 0.5  # weight of the spectral boundary in the blend (0 = local boundary only)
    spectral_vectors: int = 16  # eigenvectors after the constant one
    spectral_gamma: float = 0.12  # graph affinity exp(-boundary / gamma)
    border_ratio: float = 0.9  # drop candidates with more frame pixels than this x their contour
    nms_iou: float = 0.2  # mask NMS: drop a candidate overlapping a better one by more than this IoU
    min_area: int = 0  # drop candidates with fewer pixels
    topk: int = 20  # masks returned per image

    def check(self) -> None:
        """ValueError naming the first bad setting."""
        if self.peak_radius < 1:
            raise ValueError(f"peak_radius must be >= 1, got {self.peak_radius}")
        if not 0.0 <= self.globalization <= 1.0:
            raise ValueError(f"globalization must be in [0, 1], got {self.globalization}")
        if self.spectral_vectors < 1 or self.spectral_gamma <= 0:
            raise ValueError("spectral_vectors >= 1 and spectral_gamma > 0 are required")
        if self.border_ratio < 0 or not 0.0 < self.nms_iou <= 1.0 or self.min_area < 0 or self.topk < 1:
            raise ValueError("border_ratio >= 0, nms_iou in (0, 1], min_area >= 0 and topk >= 1 are required")


@dataclass
class Proposals:
    masks: np.ndarray  # (K, H, W) bool, best first
    scores: np.ndarray  # (K,) float in [0, 1]
    num_superpixels: int = 0
    num_candidates: int = 0
    seconds: dict = field(default_factory=dict)  # per stage: superpixels, graph, hierarchy, ranking


# ----------------------------------------------------------------------------- oracle


def oracle_affinity(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """The PA map of ground-truth instances (non-crowd COCO annotations of one image): the upper
    bound of grouping, and the target the PA predictor is trained on."""
    masks = [decode_segmentation(a["segmentation"], height, width) for a in annotations
             if not a.get("iscrowd", 0) and "segmentation" in a]
    return pairwise_affinity(instance_label_map(masks, height, width))[0]


# ----------------------------------------------------------------------------- 1. superpixels


def watershed_superpixels(pa: np.ndarray, peak_radius: int) -> tuple[np.ndarray, int]:
    """(labels 0..n-1, n): watershed on -PA from markers at its local maxima."""
    size = 2 * peak_radius + 1
    peaks = peak_local_max(pa, footprint=np.ones((size, size), dtype=bool), exclude_border=False)
    marker_mask = np.zeros(pa.shape, dtype=bool)
    marker_mask[tuple(peaks.T)] = True
    # Maxima on a plateau touch: one marker per plateau (8-connected).
    markers, count = ndi.label(marker_mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:  # a constant map has no strict maximum: one region
        return np.zeros(pa.shape, dtype=np.int32), 1
    labels = watershed(-pa, markers, connectivity=2)
    return (labels - 1).astype(np.int32), count


# ----------------------------------------------------------------------------- 2. region graph and globalisation


def spectral_embedding(labels: np.ndarray, num_regions: int, boundary: np.ndarray, num_vectors: int = 16,
                       gamma: float = 0.12) -> np.ndarray:
    """(regions x vectors) spectral embedding of the pixel affinity graph, reduced to the superpixels.

    Pixel graph: 4-connected, weight exp(-max(boundary of the two pixels) / gamma). Its normalised-cut
    relaxation L v = lambda D v is solved in the space of vectors constant on each superpixel
    (the Rayleigh-Ritz reduction of MCG's fast normalised cuts): L and D become region x region
    sums of the pixel weights, a problem of a few hundred unknowns instead of a few hundred
    thousand. Each eigenvector after the constant one is scaled to [0, 1] and divided by
    sqrt(lambda), so that the coarse partitions weigh most."""
    k = min(num_vectors + 1, num_regions - 1)
    if k < 2:
        return np.zeros((num_regions, 0))
    boundary = boundary.astype(np.float64)
    pairs = [(labels[:, :-1], labels[:, 1:], np.maximum(boundary[:, :-1], boundary[:, 1:])),
             (labels[:-1], labels[1:], np.maximum(boundary[:-1], boundary[1:]))]
    first = np.concatenate([a.ravel() for a, _, _ in pairs])
    second = np.concatenate([b.ravel() for _, b, _ in pairs])
    weight = np.exp(-np.concatenate([w.ravel() for _, _, w in pairs]) / gamma)
    degree = np.bincount(first, weight, num_regions) + np.bincount(second, weight, num_regions)
    cross = first != second  # pixel pairs inside a region cancel out of the reduced Laplacian
    between = sparse.coo_matrix((weight[cross], (first[cross], second[cross])), shape=(num_regions,) * 2).tocsr()
    between = between + between.T
    laplacian = sparse.diags(np.asarray(between.sum(axis=1)).ravel()) - between
    # Shift-invert just below 0 (L is singular): the eigenvalues nearest the shift are the smallest.
    with threadpool_limits(1):  # a few hundred unknowns: BLAS threads only contend (3x slower on 2 busy cores)
        values, vectors = eigsh(laplacian.tocsc(), k=k, M=sparse.diags(degree).tocsc(), sigma=-1e-6, which="LM")
    order = np.argsort(values)[1:]
    values, vectors = np.maximum(values[order], 1e-12), vectors[:, order]
    span = vectors.max(axis=0) - vectors.min(axis=0)
    scaled = (vectors - vectors.min(axis=0)) / np.where(span > 0, span, 1.0)
    return scaled / np.sqrt(values)


@dataclass
class RegionBorders:
    """The region adjacency graph as arrays: one row per pair of touching superpixels."""

    pairs: np.ndarray  # (E, 2) int, a < b
    weight: np.ndarray  # (E,) border strength, lower merges first
    length: np.ndarray  # (E,) boundary pixels counted along the border


def region_borders(labels: np.ndarray, num_regions: int, boundary: np.ndarray,
                   options: GroupingOptions) -> RegionBorders:
    """Borders of touching superpixels, weighted by their mean local boundary (1 - PA), blended
    with the spectral distance of the two regions (scaled to [0, 1]) when globalisation is on."""
    if num_regions == 1:
        return RegionBorders(np.zeros((0, 2), dtype=np.int64), np.zeros(0), np.zeros(0))
    rag = skgraph.rag_boundary(labels, boundary.astype(np.float64), connectivity=2)
    edges = [(min(a, b), max(a, b), d["weight"], d["count"]) for a, b, d in rag.edges(data=True)]
    pairs = np.array([e[:2] for e in edges], dtype=np.int64).reshape(-1, 2)
    weight = np.array([e[2] for e in edges], dtype=np.float64)
    length = np.array([e[3] for e in edges], dtype=np.float64)
    if options.globalization > 0 and len(edges):
        embedding = spectral_embedding(labels, num_regions, boundary, options.spectral_vectors, options.spectral_gamma)
        distance = np.abs(embedding[pairs[:, 0]] - embedding[pairs[:, 1]]).sum(axis=1)
        if distance.max() > 0:
            distance /= distance.max()
        weight = (1.0 - options.globalization) * weight + options.globalization * distance
    return RegionBorders(pairs, weight, length)


# ----------------------------------------------------------------------------- 3. hierarchy


@dataclass
class MergeTree:
    """The merge hierarchy. Nodes 0..N-1 are the superpixels; node N + k is the k-th merge, of the
    two nodes `children[k]`, so a parent's id is always larger than its children's. Every node is
    a candidate; two candidates are either nested or disjoint."""

    num_leaves: int
    children: np.ndarray  # (merges, 2) int

    @property
    def num_nodes(self) -> int:
        return self.num_leaves + len(self.children)

    def parents(self) -> np.ndarray:
        parent = np.full(self.num_nodes, -1, dtype=np.int64)
        merged = np.arange(self.num_leaves, self.num_nodes)
        parent[self.children[:, 0]], parent[self.children[:, 1]] = merged, merged
        return parent

    def subtree_sums(self, values: np.ndarray) -> np.ndarray:
        """Per node, the sum of `values` (num_nodes x ...) over the node and all its descendants."""
        out = np.array(values, dtype=np.float64)
        for k, (a, b) in enumerate(self.children.tolist()):
            out[self.num_leaves + k] += out[a] + out[b]
        return out

    def leaf_spans(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf order, first, end): the leaves of node x are order[first[x]:end[x]], a depth-first
        order in which every node's leaves are contiguous."""
        count = self.subtree_sums(np.r_[np.ones(self.num_leaves), np.zeros(len(self.children))]).astype(np.int64)
        first = np.zeros(self.num_nodes, dtype=np.int64)
        roots = np.flatnonzero(self.parents() < 0)
        first[roots] = np.r_[0, np.cumsum(count[roots])[:-1]]
        for k in range(len(self.children) - 1, -1, -1):  # parents before children
            a, b = self.children[k]
            first[a] = first[self.num_leaves + k]
            first[b] = first[a] + count[a]
        order = np.empty(self.num_leaves, dtype=np.int64)
        order[first[:self.num_leaves]] = np.arange(self.num_leaves)
        return order, first, first + count

    def common_ancestor(self, a: np.ndarray, b: np.ndarray, parent: np.ndarray) -> np.ndarray:
        """Elementwise lowest common ancestor of nodes of one tree: the smaller id climbs until they meet."""
        a, b = a.copy(), b.copy()
        apart = np.flatnonzero(a != b)
        while apart.size:
            lower_a = a[apart] < b[apart]
            a[apart[lower_a]] = parent[a[apart[lower_a]]]
            b[apart[~lower_a]] = parent[b[apart[~lower_a]]]
            apart = apart[a[apart] != b[apart]]
        return a


def merge_hierarchy(num_regions: int, borders: RegionBorders) -> MergeTree:
    """Merge the weakest border first until no border is left; the merged region's border with a
    neighbour keeps the length-weighted mean of its parts' borders (the agglomeration of
    skimage's `merge_hierarchical`, on plain dicts: networkx's bookkeeping cost ten times more)."""
    # neighbours[node] = {neighbour: [strength x length, length]}; merge k creates node num_regions + k.
    neighbours: list[dict | None] = [{} for _ in range(num_regions)]
    heap = []
    for (a, b), w, n in zip(borders.pairs.tolist(), borders.weight.tolist(), borders.length.tolist()):
        neighbours[a][b] = neighbours[b][a] = [w * n, n]
        heap.append((w, a, b))
    heapq.heapify(heap)
    children: list[tuple[int, int]] = []
    while heap:
        _, a, b = heapq.heappop(heap)
        if neighbours[a] is None or neighbours[b] is None:
            continue  # a border of a region merged since; its successor is in the heap
        new = len(neighbours)
        merged: dict = {}
        for old in (a, b):
            for other, (strength, length) in neighbours[old].items():
                if other in (a, b):
                    continue
                del neighbours[other][old]
                entry = merged.setdefault(other, [0.0, 0.0])
                entry[0] += strength
                entry[1] += length
            neighbours[old] = None
        for other, entry in merged.items():
            neighbours[other][new] = entry
            heapq.heappush(heap, (entry[0] / entry[1], other, new))
        neighbours.append(merged)
        children.append((a, b))
    return MergeTree(num_regions, np.array(children, dtype=np.int64).reshape(-1, 2))


# ----------------------------------------------------------------------------- 4. ranking


@dataclass
class _SuperpixelStats:
    """Per-superpixel sums, and the boundary pixels grouped by (own label, labels of the cross neighbourhood)."""

    pa_sum: np.ndarray  # (N,)
    area: np.ndarray  # (N,)
    frame: np.ndarray  # (N,) pixels on the image's first/last row/column (corners twice)
    group_labels: np.ndarray  # (G, 5) the labels of the pixel and its 4 neighbours, sorted (repeats kept)
    group_own: np.ndarray  # (G,) the label of the pixels themselves
    group_sums: np.ndarray  # (G, 2) PA sum and pixel count


def _superpixel_stats(labels: np.ndarray, num_regions: int, pa: np.ndarray) -> _SuperpixelStats:
    pa = pa.astype(np.float64)
    flat = labels.ravel()
    pa_sum = np.bincount(flat, pa.ravel(), minlength=num_regions)
    area = np.bincount(flat, minlength=num_regions).astype(np.float64)
    frame = sum(np.bincount(edge, minlength=num_regions) for edge in
                (labels[0], labels[-1], labels[:, 0], labels[:, -1])).astype(np.float64)
    # A pixel is on the band of a candidate when its cross neighbourhood (itself and 4 neighbours,
    # inside the image) holds labels both in and out of the candidate: only pixels whose
    # neighbourhood holds several labels can be. Group them by (own label, sorted neighbourhood).
    padded = np.pad(labels, 1, mode="edge")
    hood = np.stack([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    on_border = (hood[1:] != labels).any(axis=0)
    keys = np.concatenate([labels[on_border][:, None], np.sort(hood[:, on_border].T, axis=1)], axis=1)
    order = np.lexsort(keys.T[::-1])
    keys = keys[order]
    first_of_group = np.ones(len(keys), dtype=bool)
    first_of_group[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    group_of = np.cumsum(first_of_group) - 1
    groups = keys[first_of_group]
    sums = np.stack([np.bincount(group_of, pa[on_border][order], minlength=len(groups)),
                     np.bincount(group_of, minlength=len(groups)).astype(np.float64)], axis=1)
    return _SuperpixelStats(pa_sum, area, frame, groups[:, 1:], groups[:, 0], sums)


def rank_candidates(tree: MergeTree, stats: _SuperpixelStats) -> dict[str, np.ndarray]:
    """Per node of the tree: `rank` (band PA - inside PA; nan when the band or the inside is
    empty), `area`, `contour` (band pixels inside the node) and `frame` (pixels on the image frame).

    A pixel group is on the band of exactly the nodes that hold some but not all of its labels:
    the union of the paths from its labels up to (not including) their common ancestor. Adding
    its sums at the labels and subtracting them at the common ancestors of neighbours in leaf
    order (the union of root paths) and at the common ancestor of all, a subtree sum gives every
    node its band in one pass; the inner band is the path from the group's own label alone."""
    parent = tree.parents()
    order, first, _ = tree.leaf_spans()
    labels = np.take_along_axis(stats.group_labels, np.argsort(first[stats.group_labels], axis=1), axis=1)
    pair_ancestors = [tree.common_ancestor(labels[:, i], labels[:, i + 1], parent) for i in range(labels.shape[1] - 1)]
    top = pair_ancestors[0]
    for ancestor in pair_ancestors[1:]:
        top = tree.common_ancestor(top, ancestor, parent)
    band = np.zeros((tree.num_nodes, 2))
    inner = np.zeros((tree.num_nodes, 2))
    for column in labels.T:
        np.add.at(band, column, stats.group_sums)
    for ancestor in pair_ancestors + [top]:
        np.subtract.at(band, ancestor, stats.group_sums)
    np.add.at(inner, stats.group_own, stats.group_sums)
    np.subtract.at(inner, top, stats.group_sums)
    band, inner = tree.subtree_sums(band), tree.subtree_sums(inner)
    leaves = np.zeros((tree.num_nodes, 3))
    leaves[:tree.num_leaves] = np.stack([stats.pa_sum, stats.area, stats.frame], axis=1)
    pa_sum, area, frame = tree.subtree_sums(leaves).T
    inside_sum, inside_count = pa_sum - inner[:, 0], area - inner[:, 1]
    valid = (band[:, 1] > 0.5) & (inside_count > 0.5)  # counts are whole numbers in floating point
    with np.errstate(invalid="ignore", divide="ignore"):
        rank = np.where(valid, band[:, 0] / band[:, 1] - inside_sum / inside_count, np.nan)
    return {"rank": rank, "area": area, "contour": np.round(inner[:, 1]), "frame": frame}


def mask_nms(order: np.ndarray, first: np.ndarray, end: np.ndarray, area: np.ndarray, iou_threshold: float,
             topk: int) -> list[int]:
    """Greedy NMS over tree nodes in `order` (best first); at most topk kept. Two nodes overlap only
    when nested (their leaf spans nest), with IoU = smaller area / larger area."""
    kept: list[int] = []
    for node in order.tolist():
        nested = [k for k in kept if (first[k] <= first[node] and end[node] <= end[k])
                  or (first[node] <= first[k] and end[k] <= end[node])]
        if any(min(area[k], area[node]) > iou_threshold * max(area[k], area[node]) for k in nested):
            continue
        kept.append(node)
        if len(kept) == topk:
            break
    return kept


# ----------------------------------------------------------------------------- the whole grouping


def group(pa: np.ndarray, options: GroupingOptions = GroupingOptions()) -> Proposals:
    """Top-ranked class-agnostic masks of one PA map (H x W, values in [0, 1])."""
    options.check()
    pa = np.clip(np.asarray(pa, dtype=np.float32), 0.0, 1.0)
    if pa.ndim != 2:
        raise ValueError(f"expected an H x W affinity map, got shape {pa.shape}")
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal start
        now = time.perf_counter()
        seconds[stage], start = now - start, now

    labels, num_regions = watershed_superpixels(pa, options.peak_radius)
    lap("superpixels")
    borders = region_borders(labels, num_regions, 1.0 - pa, options)
    lap("graph")
    tree = merge_hierarchy(num_regions, borders)
    lap("hierarchy")
    ranked = rank_candidates(tree, _superpixel_stats(labels, num_regions, pa))
    eligible = (~np.isnan(ranked["rank"]) & (ranked["area"] >= max(options.min_area, 1))
                & (ranked["frame"] <= options.border_ratio * ranked["contour"]))
    candidates = np.flatnonzero(eligible)
    leaf_order, first, end = tree.leaf_spans()
    best_first = candidates[np.argsort(ranked["rank"][candidates], kind="stable")]
    kept = mask_nms(best_first, first, end, ranked["area"], options.nms_iou, options.topk)
    masks = np.zeros((len(kept),) + pa.shape, dtype=bool)
    for k, node in enumerate(kept):
        chosen = np.zeros(num_regions, dtype=bool)
        chosen[leaf_order[first[node]:end[node]]] = True
        masks[k] = chosen[labels]
    scores = np.clip((1.0 - ranked["rank"][kept]) / 2.0, 0.0, 1.0)
    lap("ranking")
    return Proposals(masks, scores.astype(np.float32), num_regions, tree.num_nodes, seconds)


def image_record(job: dict) -> tuple[str, int] | tuple[int, str]:
    """(the record line `{"index", "image", "annotations"}`, its number of masks) of one image of a
    generation job: its PA map (`pa`, or the oracle's from `annotations`) grouped with `options` (a
    GroupingOptions dict) into scored masks, drawn on the image when the job has an `overlay`
    (image file, PNG). A job with an `error` (an unreadable image) comes back as (index, reason).
    Runs in the worker processes of orchestrate/pa_source.py, so this module stays free of torch."""
    if "error" in job:
        return job["index"], job["error"]
    image = job["image"]
    pa = job["pa"] if "pa" in job else oracle_affinity(job["annotations"], image["height"], image["width"])
    proposals = group(pa, GroupingOptions(**job["options"]))
    annotations = [make_annotation(mask, image["id"], 1, float(score), job["mask_format"])
                   for mask, score in zip(proposals.masks, proposals.scores)]
    if job.get("overlay"):
        save_overlay(load_rgb(job["overlay"][0]), list(proposals.masks), [float(s) for s in proposals.scores],
                     [None] * len(annotations), Path(job["overlay"][1]), file_name=image["file_name"],
                     source=job["overlay"][0])
    return json.dumps({"index": job["index"], "image": image, "annotations": annotations}), len(annotations)
