"""The paper's linear-probe evaluation: freeze a trained DeepLab-v3, train only a new 1x1 classifier on GT labels.

The frozen part (backbone, ASPP, 3x3 conv, all BatchNorm statistics) stays in eval mode; only
`head[4]` learns. Training resumes automatically from the probe's latest checkpoint in the output folder,
when that checkpoint was made with the same settings, `pretrained` network and data (else it is refused).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from utils.crf import CRFParams, dense_crf
from utils.workers import default_workers, run_pool
from segmentation.data import SegmentationDataset
from segmentation.engine import (DEFAULTS, PROBE_KIND, RESUME_HARMLESS_KEYS, SCHEMA, build_train_dataset,
                                 build_val_dataset, class_names, evaluate, format_iou, iou_result, load_trained_model,
                                 poly_schedule, predict_logits, segmentation_loss)
from utils.coco_io import check_can_write, write_json
from utils.config import ConfigSchema, load_config
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.images import ImageReadError, load_rgb
from utils.label_png import IGNORE_INDEX
from evaluation.metrics import confusion_matrix
from utils.progress import Progress
from utils.samplers import resumable_loader, worker_batches
from utils.training import LoopSettings, TrainingRun, seed_all

PROBE_FINAL = "probe_final.pth"
PROBE_DEFAULTS = copy.deepcopy(DEFAULTS)
PROBE_DEFAULTS["pretrained"] = None  # the trained DeepLab-v3 checkpoint to probe
PROBE_DEFAULTS["solver"].update(base_lr=0.1, max_iter=20000, checkpoint_period=1000, eval_period=0)
PROBE_SCHEMA = SCHEMA.extend(PROBE_DEFAULTS, types={"pretrained": str})
ENV_SCHEMA = ConfigSchema({"root_dir": "outputs/"})  # --config_env: where the probes' folders go


def load_probe_config(config_env: str | None, config_exp: str, overrides: list[str] | None = None) -> dict:
    """`--config_env` gives `root_dir`; the output folder is root_dir/<config_exp name>, as in MaskDistill."""
    config = load_config(config_exp, overrides, defaults=PROBE_SCHEMA)
    root = load_config(config_env, defaults=ENV_SCHEMA)["root_dir"] if config_env else None
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


def crf_postprocessor(dataset: SegmentationDataset) -> Callable[[int, np.ndarray], np.ndarray]:
    """`evaluate` hook: dense CRF on the softmax with the original image, then argmax (in-process;
    `evaluate_with_crf` does the same with a pool of CPU processes)."""
    def postprocess(index: int, probs: np.ndarray) -> np.ndarray:
        image, _ = dataset.load(index)
        return dense_crf(image, probs, CRFParams()).argmax(axis=0)
    return postprocess


def check_probe_output_dir(config: dict) -> None:
    """Refuse to train the probe in the folder of the network it probes (other runs' checkpoints are refused
    on resume, by their fingerprint)."""
    output_dir = Path(config["output_dir"])
    pretrained = Path(config["pretrained"]) if config.get("pretrained") else None
    if pretrained is not None and output_dir.resolve() == pretrained.resolve().parent:
        raise UserError(f"the probe's output folder {output_dir} is the folder of the network it probes; "
                        f"set --config_env (root_dir) or output_dir to another folder")


def _crf_argmax_job(job: tuple) -> tuple[int, np.ndarray]:
    """Worker: dense CRF on one softmax map with its image; returns (index, refined class map)."""
    index, image_path, probs, params = job
    try:
        image = np.array(load_rgb(image_path))
    except ImageReadError as exc:
        raise UserError(f"cannot read image {image_path}: {exc}") from None
    return index, dense_crf(image, probs.astype(np.float32), CRFParams(**params)).argmax(axis=0).astype(np.uint8)


@torch.no_grad()
def evaluate_with_crf(model: nn.Module, dataset: SegmentationDataset, config: dict, dist: DistInfo,
                      workers: int | None = None, chunk: int = 16) -> dict:
    """`evaluate` with the dense CRF on every softmax, refined by a pool of CPU processes.

    The network predicts a chunk of images (softmax kept as float16 to halve the transfer), the pool
    refines that chunk, and the confusion matrix accumulates at label resolution (255 ignored).
    Under torchrun the ranks split the images and their matrices are summed.
    """
    num_classes = int(config["data"]["num_classes"])
    amp = bool(config["solver"].get("amp")) and dist.device.type == "cuda"
    workers = workers or max(1, default_workers() // dist.world_size)
    shard = list(range(dist.rank, len(dataset), dist.world_size))
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    params = asdict(CRFParams())
    model.eval()
    progress = Progress(total=len(shard), desc="eval+crf", unit="img", enabled=dist.is_main)
    for start in range(0, len(shard), chunk):
        loader = DataLoader(Subset(dataset, shard[start:start + chunk]), batch_size=1,
                            num_workers=int(config["data"]["num_workers"]))
        jobs, labels = [], {}
        for batch in worker_batches(loader):
            index = int(batch["index"][0])
            probs = torch.softmax(predict_logits(model, batch["image"].to(dist.device), amp), dim=1)
            jobs.append((index, str(dataset.images[index]), probs[0].cpu().numpy().astype(np.float16), params))
            labels[index] = batch["label"][0].numpy()
        for index, pred in run_pool(_crf_argmax_job, jobs, workers, desc="crf", show_progress=False):
            conf += confusion_matrix(pred, labels.pop(index), num_classes, IGNORE_INDEX)
            progress.update(1)
    progress.close()
    if dist.distributed:
        total = torch.from_numpy(conf).to(dist.device)
        torch.distributed.all_reduce(total)
        conf = total.cpu().numpy()
    return iou_result(conf, class_names(config))


def train_probe(config: dict, dist: DistInfo, overwrite: bool = False) -> Path:
    """Train the 1x1 classifier (the loop is utils/training.py's); returns the final weights (probe_final.pth).

    Resumes by itself from the probe's newest checkpoint, but only one made with the same settings,
    `pretrained` network and data; `overwrite` starts again.
    """
    if dist.distributed:
        raise UserError("the linear probe trains in a single process; run linear_finetune.py without torchrun")
    solver = config["solver"]
    check_probe_output_dir(config)
    loop = LoopSettings.from_solver(solver, final_name=PROBE_FINAL, desc="probe")
    seed_all(loop.seed)
    model = build_probe_model(config, dist.device)
    dataset = build_train_dataset(config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(solver["base_lr"]),
                                momentum=float(solver["momentum"]), weight_decay=float(solver["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(loop.max_iter, float(solver["poly_power"])))
    run = TrainingRun(config["output_dir"], model, optimizer, scheduler, loop, dist, config=config,
                      fingerprint=fingerprint(PROBE_KIND, config, RESUME_HARMLESS_KEYS))
    run.prepare(resume=True, overwrite=overwrite)
    loader = resumable_loader(dataset, int(solver["batch_size"]), loop.seed, 0, 1, run.start_iter,
                              int(config["data"]["num_workers"]))

    def step(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        images, labels = batch["image"].to(dist.device), batch["label"].to(dist.device)
        with torch.no_grad():
            features = model.embed(images)  # frozen: the model stays in eval mode
        with torch.autocast(dist.device.type, enabled=False):
            logits = nn.functional.interpolate(model.head[4](features.float()), size=images.shape[-2:],
                                               mode="bilinear", align_corners=False)
        return {"loss_ce": segmentation_loss(logits, labels)}

    return run.train(step, loader)


def build_probe_val_dataset(config: dict) -> SegmentationDataset:
    val = build_val_dataset(config)
    if val is None:
        raise UserError("config key data.val_list is not set: nothing to evaluate on")
    return val


def evaluate_probe(config: dict, dist: DistInfo, model_path: str | Path, crf_postprocess: bool = False,
                   val: SegmentationDataset | None = None, workers: int | None = None) -> dict:
    """mIoU and per-class IoU of a saved probe on the validation set (optionally with dense CRF).

    The probe checkpoint holds the whole network and its architecture, so `pretrained` is not needed here.
    """
    val = val if val is not None else build_probe_val_dataset(config)
    model = load_trained_model(config, model_path, dist.device)
    if model.classifier.out_channels != int(config["data"]["num_classes"]):
        raise UserError(f"probe weights {model_path} predict {model.classifier.out_channels} classes but "
                        f"data.num_classes is {config['data']['num_classes']}")
    if crf_postprocess:
        result = evaluate_with_crf(model, val, config, dist, workers)
    else:
        result = evaluate(model, val, config, dist)
    result["crf_postprocess"] = crf_postprocess
    result["model_path"] = str(model_path)
    return result


def run_linear_probe(config: dict, dist: DistInfo, model_path: str | None = None, crf_postprocess: bool = False,
                     workers: int | None = None, overwrite: bool = False) -> dict:
    """Train (unless `model_path` is given) and evaluate; writes results.json and prints the IoU table.

    An existing results file is never replaced silently: `overwrite` replaces it (and trains again).
    """
    config = copy.deepcopy(config)
    results_path = Path(config["output_dir"]) / ("results_crf.json" if crf_postprocess else "results.json")
    check_can_write(results_path, overwrite)
    val = build_probe_val_dataset(config)  # checked before training, not after it
    path = Path(model_path) if model_path else train_probe(config, dist, overwrite)
    result = evaluate_probe(config, dist, path, crf_postprocess, val, workers)
    result["pretrained"] = config.get("pretrained")
    if dist.is_main:
        write_json(results_path, result, indent=1)
        print(format_iou(result))
    return result
