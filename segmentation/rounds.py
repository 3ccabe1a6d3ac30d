"""Iterative refinement: train, predict the training images, CRF-refine the softmax, write new labels, retrain.

Layout under `output_dir`:
    round_0/                  training on the given pseudo-labels (data.label_dir)
    round_1/labels/*.png      round_0's predictions refined by the dense CRF
    round_1/                  training on round_1/labels
    ...
Every step is resumable: finished trainings (model_final.pth) and written label PNGs are kept.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from segmentation.crf import CRFParams, default_workers, dense_crf, run_pool
from segmentation.data import EvalTransform, SegmentationDataset, read_image_list
from segmentation.engine import load_trained_model, predict_logits, train, worker_batches
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.images import ImageReadError, load_rgb
from utils.label_png import write_label_png


def _crf_job(job: tuple) -> str:
    """Worker: CRF-refine one softmax map and write the argmax as a label PNG."""
    image_path, probs, out_path, params = job
    try:
        image = np.array(load_rgb(image_path))
    except ImageReadError as exc:
        raise UserError(f"cannot read image {image_path}: {exc}") from None
    refined = dense_crf(image, probs.astype(np.float32), CRFParams(**params))
    write_label_png(out_path, refined.argmax(axis=0).astype(np.uint8))
    return out_path


@torch.no_grad()
def predict_crf_labels(model: torch.nn.Module, dataset: SegmentationDataset, out_dir: Path, dist: DistInfo,
                       workers: int | None = None, params: CRFParams = CRFParams(), chunk: int = 16) -> int:
    """Write CRF-refined predictions for every image of `dataset` to `out_dir/<name>.png`; returns how many.

    Ranks split the images; each refines its share with a CPU pool, a chunk at a time to bound memory.
    """
    todo = [i for i in range(dist.rank, len(dataset), dist.world_size)
            if not (out_dir / f"{dataset.names[i]}.png").exists()]
    workers = workers or max(1, default_workers() // dist.world_size)
    amp = dist.device.type == "cuda"
    model.eval()
    written = 0
    for start in range(0, len(todo), chunk):
        jobs = []
        subset = torch.utils.data.Subset(dataset, todo[start:start + chunk])
        for batch in worker_batches(torch.utils.data.DataLoader(subset, batch_size=1)):
            index = int(batch["index"][0])
            logits = predict_logits(model, batch["image"].to(dist.device), amp)
            probs = torch.softmax(logits, dim=1)[0].cpu().numpy().astype(np.float16)  # halves the IPC cost
            jobs.append((str(dataset.images[index]), probs, str(out_dir / f"{dataset.names[index]}.png"),
                         asdict(params)))
        written += len(run_pool(_crf_job, jobs, workers, desc=f"crf labels {start + len(jobs)}/{len(todo)}"))
    return written


def train_plus_crf(config: dict, dist: DistInfo, rounds: int, workers: int | None = None,
                   params: CRFParams = CRFParams()) -> dict:
    """Train `rounds + 1` models, each (after the first) on CRF-refined predictions of the previous one."""
    if rounds < 0:
        raise UserError(f"--rounds must be >= 0, not {rounds}")
    root = Path(config["output_dir"])
    d = config["data"]
    label_dir = Path(d["label_dir"]) if d.get("label_dir") else None
    if label_dir is None:
        raise UserError("config key data.label_dir (the initial pseudo-labels) is not set")
    history = []
    for r in range(rounds + 1):
        round_dir = root / f"round_{r}"
        if r > 0:
            label_dir = round_dir / "labels"
            names = read_image_list(d["train_list"])
            dataset = SegmentationDataset(d["image_dir"], names, None, int(d["num_classes"]), EvalTransform())
            model = load_trained_model(config, root / f"round_{r - 1}" / "model_final.pth", dist.device)
            count = predict_crf_labels(model, dataset, label_dir, dist, workers, params)
            barrier()
            if dist.is_main:
                print(f"round {r}: wrote {count} CRF-refined labels to {label_dir}")
            del model
        final = round_dir / "model_final.pth"
        round_config = copy.deepcopy(config)
        round_config["output_dir"] = str(round_dir)
        round_config["data"]["label_dir"] = str(label_dir)
        if final.exists():
            if dist.is_main:
                print(f"round {r}: {final} exists, skipping its training")
            history.append({"round": r, "checkpoint": str(final), "labels": str(label_dir)})
            continue
        result = train(round_config, dist, resume=True, label_dir=label_dir)
        history.append({"round": r, "checkpoint": result["checkpoint"], "labels": str(label_dir),
                        "mIoU": result["metrics"].get("mIoU")})
    return {"rounds": history, "checkpoint": history[-1]["checkpoint"]}
