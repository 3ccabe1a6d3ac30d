"""Iterative refinement: train, predict the training images, CRF-refine the softmax, write new labels, retrain.

The rounds run on utils/rounds.py. Layout under `output_dir`:
    round0/                  training on the given pseudo-labels (data.label_dir)
    round1/labels/*.png      round0's predictions refined by the dense CRF
    round1/                  training on round1/labels
    ...
Each round records its settings (training config, CRF parameters) in roundN/round.json: a finished round
is skipped, a round made with other settings is refused (rerun with `overwrite`), and inside an
unfinished round the written label PNGs are kept and the training resumes.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from utils.crf import CRFParams, dense_crf
from utils.workers import default_workers, run_pool
from segmentation.data import EvalTransform, SegmentationDataset, read_image_list
from segmentation.engine import RESUME_HARMLESS_KEYS, load_trained_model, predict_logits, train
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.images import ImageReadError, load_rgb
from utils.label_png import write_label_png
from utils.rounds import Round, RoundSpec, run_rounds
from utils.samplers import worker_batches

CRF_ROUNDS_KIND = "deeplab_crf_round"
# The number of rounds is not a setting of one round: more rounds later reuse the finished ones.
ROUND_HARMLESS_KEYS = RESUME_HARMLESS_KEYS + ("crf_rounds.*",)


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
                   params: CRFParams = CRFParams(), overwrite: bool = False) -> dict:
    """Train `rounds + 1` models, each (after the first) on CRF-refined predictions of the previous one.

    Returns {"rounds": [{"round", "checkpoint", "labels", "mIoU"}], "checkpoint": the last model}.
    """
    if rounds < 0:
        raise UserError(f"--rounds must be >= 0, not {rounds}")
    d = config["data"]
    if not d.get("label_dir"):
        raise UserError("config key data.label_dir (the initial pseudo-labels) is not set")
    specs = [RoundSpec(n, fingerprint(CRF_ROUNDS_KIND, {**config, "crf": asdict(params) if n else None},
                                      ROUND_HARMLESS_KEYS)) for n in range(rounds + 1)]

    def run_round(round: Round) -> dict:
        round_config = copy.deepcopy(config)
        round_config["output_dir"] = str(round.directory)
        if round.previous is not None:
            label_dir = round.directory / "labels"
            names = read_image_list(d["train_list"])
            dataset = SegmentationDataset(d["image_dir"], names, None, int(d["num_classes"]), EvalTransform())
            model = load_trained_model(config, round.previous.result["checkpoint"], dist.device)
            count = predict_crf_labels(model, dataset, label_dir, dist, workers, params)
            barrier()
            if dist.is_main:
                print(f"round {round.number}: wrote {count} CRF-refined labels to {label_dir}")
            round_config["data"]["label_dir"] = str(label_dir)
        result = train(round_config, dist, resume=True)
        return {"checkpoint": result["checkpoint"], "labels": round_config["data"]["label_dir"],
                "mIoU": result["metrics"].get("mIoU")}

    done = run_rounds(config["output_dir"], specs, run_round, dist, overwrite)
    return {"rounds": [{"round": r.number, **r.result} for r in done], "checkpoint": done[-1].result["checkpoint"]}
