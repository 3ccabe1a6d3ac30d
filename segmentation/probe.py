"""The paper's linear-probe evaluation: freeze a trained DeepLab-v3, train only a new 1x1 classifier on GT labels.

The frozen part (backbone, ASPP, 3x3 conv, all BatchNorm statistics) stays in eval mode; only
`head[4]` learns. Training resumes automatically from the probe's latest checkpoint in the output folder.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segmentation.crf import CRFParams, dense_crf
from segmentation.data import ShardedBatchSampler
from segmentation.engine import (DEFAULTS, build_train_dataset, build_val_dataset, evaluate, format_iou,
                                 load_trained_model, poly_schedule, segmentation_loss, worker_batches)
from utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from utils.coco_io import write_json
from utils.config import load_config, load_yaml, save_config
from utils.distributed import DistInfo
from utils.errors import UserError

PROBE_DEFAULTS = copy.deepcopy(DEFAULTS)
PROBE_DEFAULTS["pretrained"] = None  # the trained DeepLab-v3 checkpoint to probe
PROBE_DEFAULTS["solver"].update(base_lr=0.1, max_iter=20000, checkpoint_period=1000, eval_period=0)


def load_probe_config(config_env: str | None, config_exp: str, overrides: list[str] | None = None) -> dict:
    """`--config_env` gives `root_dir`; the output folder is root_dir/<config_exp name>, as in MaskDistill."""
    config = load_config(config_exp, overrides, defaults=PROBE_DEFAULTS)
    root = load_yaml(config_env).get("root_dir", "outputs/") if config_env else None
    if root is not None:
        config["output_dir"] = str(Path(root) / Path(config_exp).stem)
    return config


def build_probe_model(config: dict, device: torch.device) -> nn.Module:
    """The trained network (from `pretrained`) with a freshly initialised 1x1 classifier; all else frozen."""
    if not config.get("pretrained"):
        raise UserError("config key 'pretrained' (the trained DeepLab-v3 checkpoint to probe) is not set")
    model = load_trained_model(config, config["pretrained"], torch.device("cpu"))
    old = model.head[4]
    model.head[4] = nn.Conv2d(old.in_channels, int(config["data"]["num_classes"]), 1)
    nn.init.normal_(model.head[4].weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.head[4].bias)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.4.")
    return model.to(device).eval()


def crf_postprocessor(dataset):
    """`evaluate` hook: dense CRF on the softmax with the original image, then argmax."""
    def postprocess(index: int, probs: np.ndarray) -> np.ndarray:
        image, _ = dataset.load(index)
        return dense_crf(image, probs, CRFParams()).argmax(axis=0)
    return postprocess


def train_probe(config: dict, dist: DistInfo) -> Path:
    """Train the 1x1 classifier; returns the path of the final probe weights (probe_final.pth)."""
    solver = config["solver"]
    output_dir = Path(config["output_dir"])
    torch.manual_seed(int(solver["seed"]))
    model = build_probe_model(config, dist.device)
    dataset = build_train_dataset(config)
    output_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good
    save_config(config, output_dir / "config.yaml")
    batch = int(solver["batch_size"])
    sampler = ShardedBatchSampler(len(dataset), batch, seed=int(solver["seed"]))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(config["data"]["num_workers"]),
                        generator=torch.Generator())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(solver["base_lr"]), momentum=float(solver["momentum"]),
                                weight_decay=float(solver["weight_decay"]))
    max_iter = int(solver["max_iter"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(max_iter, float(solver["poly_power"])))
    iteration = 0
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        iteration = int(load_checkpoint(checkpoint, model, optimizer, scheduler)["iteration"])
        print(f"resuming the probe from {checkpoint} at iteration {iteration}")
    amp = bool(solver["amp"]) and dist.device.type == "cuda"
    progress = tqdm(total=max_iter, initial=iteration, desc="probe", unit="it", disable=None)
    metrics = output_dir / "metrics.jsonl"
    while iteration < max_iter:
        epoch, offset = divmod(iteration, sampler.iters_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, offset)
        for item in worker_batches(loader):
            images = item["image"].to(dist.device)
            labels = item["label"].to(dist.device)
            with torch.no_grad(), torch.autocast(dist.device.type, dtype=torch.float16, enabled=amp):
                features = model.embed(images)
            logits = nn.functional.interpolate(model.head[4](features.float()), size=images.shape[-2:],
                                               mode="bilinear", align_corners=False)
            loss = segmentation_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            iteration += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if iteration % int(solver["log_period"]) == 0 or iteration == max_iter:
                with open(metrics, "a") as f:
                    f.write(json.dumps({"iteration": iteration, "loss": loss.item(),
                                        "lr": optimizer.param_groups[0]["lr"], "time": time.time()}) + "\n")
            period = int(solver["checkpoint_period"])
            if iteration == max_iter or (period > 0 and iteration % period == 0):
                save_checkpoint(output_dir / f"model_{iteration:07d}.pth", model, optimizer, scheduler, iteration, config)
            if iteration >= max_iter:
                break
    progress.close()
    final = output_dir / "probe_final.pth"
    save_checkpoint(final, model, None, None, iteration, config)
    return final


def evaluate_probe(config: dict, dist: DistInfo, model_path: str | Path, crf_postprocess: bool = False) -> dict:
    """mIoU and per-class IoU of a saved probe on the validation set (optionally with dense CRF)."""
    val = build_val_dataset(config)
    if val is None:
        raise UserError("config key data.val_list is not set: nothing to evaluate on")
    model = build_probe_model(config, torch.device("cpu"))
    try:
        load_checkpoint(model_path, model, restore_rng=False)
    except (RuntimeError, KeyError) as exc:
        raise UserError(f"probe weights {model_path} do not fit the configured model: "
                        f"{str(exc).strip().splitlines()[0]}") from None
    model.to(dist.device).eval()
    result = evaluate(model, val, config, dist, crf_postprocessor(val) if crf_postprocess else None)
    result["crf_postprocess"] = crf_postprocess
    result["model_path"] = str(model_path)
    return result


def run_linear_probe(config: dict, dist: DistInfo, model_path: str | None = None,
                     crf_postprocess: bool = False) -> dict:
    """Train (unless `model_path` is given) and evaluate; writes results.json and prints the IoU table."""
    config = copy.deepcopy(config)
    path = Path(model_path) if model_path else train_probe(config, dist)
    result = evaluate_probe(config, dist, path, crf_postprocess)
    out = Path(config["output_dir"])
    name = "results_crf.json" if crf_postprocess else "results.json"
    write_json(out / name, result, indent=1)
    print(format_iou(result))
    return result
