"""The paper's "clusters" number: K-means on frozen pixel embeddings over val, Hungarian matching to classes, mIoU.

Embeddings are the trained DeepLab-v3's `head[:4]` output (before the classifier), L2-normalised. K-means is
fitted on a random subsample of embedding pixels; every val pixel then takes its nearest centroid (embeddings
upsampled bilinearly to the label size). Clusters are matched one-to-one to classes over the whole split.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, Subset

from segmentation.data import SegmentationDataset
from segmentation.engine import iou_result, worker_batches
from segmentation.model import DeepLabV3
from utils.label_png import IGNORE_INDEX
from evaluation.metrics import confusion_matrix, miou_row
from evaluation.rows import MetricRow
from utils.progress import progress


@torch.no_grad()
def _embeddings(model: DeepLabV3, image: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    features = model.embed(image).float()
    if size is not None:
        features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    return F.normalize(features[0], dim=0)  # (C, h, w)


def fit_kmeans(model: DeepLabV3, dataset: SegmentationDataset, num_clusters: int, device: torch.device,
               max_fit_pixels: int = 200_000, seed: int = 0, num_workers: int = 0,
               max_fit_images: int | None = None) -> np.ndarray:
    """Centroids (K, C) from a uniform subsample of the embedding pixels of the dataset, or of `max_fit_images`
    images evenly spaced through it (the fit then embeds those only: on a CPU the embedding is the cost)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    if max_fit_images is not None and max_fit_images < len(dataset):
        dataset = Subset(dataset, np.linspace(0, len(dataset) - 1, max_fit_images).round().astype(int).tolist())
    per_image = max(1, max_fit_pixels // max(1, len(dataset)))
    samples = []
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    for batch in progress(worker_batches(loader), total=len(dataset), desc="embed", unit="img"):
        emb = _embeddings(model, batch["image"].to(device)).flatten(1).T.cpu().numpy()  # (h*w, C)
        take = rng.choice(emb.shape[0], size=min(per_image, emb.shape[0]), replace=False)
        samples.append(emb[take])
    data = np.concatenate(samples)
    if data.shape[0] < num_clusters:
        raise ValueError(f"only {data.shape[0]} embedding pixels for {num_clusters} clusters")
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit(data)
    return kmeans.cluster_centers_.astype(np.float32)


def hungarian_from_counts(counts: np.ndarray) -> dict[int, int]:
    """cluster -> class, maximising matched pixels; counts[k, c] = pixels of cluster k with class c.

    The same assignment as evaluation.metrics.hungarian_match, computed from accumulated counts so that the
    pixels of a whole split need not be held in memory.
    """
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


@torch.no_grad()
def evaluate_clusters(model: DeepLabV3, dataset: SegmentationDataset, num_classes: int, class_names: list[str],
                      device: torch.device, num_clusters: int | None = None, max_fit_pixels: int = 200_000,
                      seed: int = 0, num_workers: int = 0, max_fit_images: int | None = None) -> dict:
    """K-means + Hungarian matching; returns the mIoU table plus the cluster -> class mapping."""
    num_clusters = num_clusters or num_classes
    if num_clusters != num_classes:
        raise ValueError(f"Hungarian matching needs as many clusters as classes ({num_classes}), not {num_clusters}")
    model.eval()
    centroids = torch.from_numpy(fit_kmeans(model, dataset, num_clusters, device, max_fit_pixels, seed,
                                            num_workers, max_fit_images)).to(device)
    joint = np.zeros((num_classes, num_clusters), dtype=np.int64)  # rows: class, columns: cluster
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    for batch in progress(worker_batches(loader), total=len(dataset), desc="assign", unit="img"):
        label = batch["label"][0].numpy()
        emb = _embeddings(model, batch["image"].to(device), size=label.shape)
        flat = emb.flatten(1).T  # (H*W, C)
        # Nearest centroid in Euclidean distance (the K-means criterion).
        dist = (centroids * centroids).sum(1)[None, :] - 2 * flat @ centroids.T
        clusters = dist.argmin(1).view(label.shape).cpu().numpy()
        joint += confusion_matrix(clusters, label, num_classes, IGNORE_INDEX)
    mapping = hungarian_from_counts(joint.T)
    # With a one-to-one mapping, the class confusion matrix is the joint counts with permuted columns.
    conf = np.zeros_like(joint)
    for cluster, cls in mapping.items():
        conf[:, cls] += joint[:, cluster]
    result = iou_result(conf, class_names)
    result["mapping"] = mapping
    result["num_clusters"] = num_clusters
    return result


def clusters_miou_row(table: dict, label: str, against: str, stage: str) -> MetricRow:
    """`evaluate_clusters`' mIoU as a row named "<label> mIoU (K-means on its pixel embeddings, Hungarian-matched)"."""
    return miou_row(table, f"{label} mIoU (K-means on its pixel embeddings, Hungarian-matched)", against, stage)
