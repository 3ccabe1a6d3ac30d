"""DeepLab-v3 training (model, data and loss; the loop is utils/training.py's) and evaluation.

Poly LR, cross-entropy ignoring 255, validation during training; AMP, DDP, exact resume and
metrics.jsonl come from the shared toolkit.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from segmentation.data import EvalTransform, SegmentationDataset, TrainTransform, read_image_list
from segmentation.model import build_from_config
from segmentation.settings import DEFAULTS, SCHEMA, TINY_EXAMPLE, TRAIN_KEYS, VAL_KEYS  # noqa: F401 (re-exported)
from utils.checkpoint import read_torch_file, require_checkpoint_kind, unwrap
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.label_png import IGNORE_INDEX
from evaluation.metrics import confusion_matrix, iou_from_confusion
from utils.progress import progress
from utils.samplers import resumable_loader, worker_batches
from utils.state_dicts import state_dict_mismatch
from utils.training import HARMLESS_KEYS, LoopSettings, TrainingRun, seed_all, split_batch
from utils.voc import VOC_SEGMENTATION_CLASSES

# The fingerprint kinds of DeepLab-v3 training and linear-probe checkpoints (utils/checkpoint.CHECKPOINT_KINDS).
DEEPLAB_KIND = "deeplab"
PROBE_KIND = "linear_probe"

# Keys a resumed training may change: the toolkit's and the validation set's.
RESUME_HARMLESS_KEYS = HARMLESS_KEYS + ("data.val_*", "data.class_names",
                                        "model.vit.cache_dir")  # the cache changes no value (feature_cache.py)


def class_names(config: dict) -> list[str]:
    names = config["data"].get("class_names")
    n = int(config["data"]["num_classes"])
    if names:
        return list(names)
    return list(VOC_SEGMENTATION_CLASSES) if n == len(VOC_SEGMENTATION_CLASSES) else [str(i) for i in range(n)]


def _require(config: dict, *keys: str) -> None:
    for key in keys:
        if not config["data"].get(key):
            raise UserError(f"config key data.{key} is not set (set it in the YAML or with --set data.{key}=...)")


def build_train_dataset(config: dict) -> SegmentationDataset:
    _require(config, "image_dir", "train_list", "label_dir")
    d = config["data"]
    return SegmentationDataset(d["image_dir"], read_image_list(d["train_list"]), d["label_dir"], int(d["num_classes"]),
                               TrainTransform(d["crop_size"], d["scale_range"], d["flip"]),
                               seed=int(config["solver"]["seed"]))


def build_val_dataset(config: dict) -> SegmentationDataset | None:
    d = config["data"]
    if not d.get("val_list"):
        return None
    _require(config, "val_label_dir")
    image_dir = d.get("val_image_dir") or d.get("image_dir")
    if not image_dir:
        raise UserError("config key data.val_image_dir (or data.image_dir) is not set")
    return SegmentationDataset(image_dir, read_image_list(d["val_list"]), d["val_label_dir"],
                               int(d["num_classes"]), EvalTransform())


def poly_schedule(max_iter: int, power: float) -> Callable[[int], float]:
    """LambdaLR factor (1 - it / max_iter) ** power, 0 from max_iter on."""
    return lambda it: max(0.0, 1.0 - it / max_iter) ** power


def build_optimizer(model: nn.Module, solver: dict) -> torch.optim.Optimizer:
    model = unwrap(model)
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    lr = float(solver["base_lr"])
    groups = [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * float(solver["head_lr_mult"])}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=float(solver["momentum"]),
                           weight_decay=float(solver["weight_decay"]))


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ignoring 255; a batch with no labelled pixel gives 0 (not NaN) and zero gradients."""
    if not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def train(config: dict, dist: DistInfo, resume: bool = False, overwrite: bool = False) -> dict:
    """Train DeepLab-v3 as the config says (the loop is utils/training.py's).

    Returns {"iteration", "checkpoint", "metrics" (the last validation: mIoU, per-class IoU; {} without)}.
    """
    solver, d = config["solver"], config["data"]
    per_rank_batch = split_batch(solver["batch_size"], dist.world_size, "solver.batch_size")
    if per_rank_batch < 2:
        raise UserError("each process needs a batch of at least 2 images (BatchNorm); raise solver.batch_size")
    loop = LoopSettings.from_solver(solver)
    dataset = build_train_dataset(config)
    val_dataset = build_val_dataset(config)

    seed_all(loop.seed)  # identical initial weights on every process
    model = build_from_config(config).to(dist.device)
    if dist.distributed and dist.device.type == "cuda" and solver.get("sync_bn", True):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, solver)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(loop.max_iter, float(solver["poly_power"])))
    run = TrainingRun(config["output_dir"], model, optimizer, scheduler, loop, dist, config=config,
                      fingerprint=fingerprint(DEEPLAB_KIND, config, RESUME_HARMLESS_KEYS))
    run.prepare(resume, overwrite)
    loader = resumable_loader(dataset, per_rank_batch, loop.seed, dist.rank, dist.world_size, run.start_iter,
                              int(d["num_workers"]), pin_memory=dist.device.type == "cuda")
    model.train()

    def step(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["image"].to(dist.device, non_blocking=True))
        return {"loss_ce": segmentation_loss(logits, batch["label"].to(dist.device, non_blocking=True))}

    def validate() -> dict:
        result = evaluate(model, val_dataset, config, dist)
        if dist.is_main:
            print(format_iou(result))
        return {"mIoU": result["mIoU"], "per_class_iou": result["per_class_iou"]}

    final = run.train(step, loader, evaluate=validate if val_dataset is not None else None)
    return {"iteration": loop.max_iter, "checkpoint": str(final), "metrics": run.evaluation or {}}


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """(1, 3, H, W) normalised image -> (1, C, H, W) float32 logits at the input size."""
    with torch.autocast(device_type=image.device.type, dtype=torch.float16, enabled=amp):
        return model(image).float()


def evaluate(model: nn.Module, dataset: SegmentationDataset, config: dict, dist: DistInfo | None = None,
             postprocess=None) -> dict:
    """mIoU and per-class IoU over the dataset at label resolution (255 ignored), sharded over ranks.

    `postprocess(index, probs)` may refine the (C, H, W) softmax before the argmax (e.g. dense CRF).
    """
    dist = dist or DistInfo()
    num_classes = int(config["data"]["num_classes"])
    device = dist.device
    amp = bool(config["solver"].get("amp")) and device.type == "cuda"
    shard = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(Subset(dataset, shard), batch_size=1, num_workers=int(config["data"]["num_workers"]))
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    # The plain module: DDP's forward would broadcast buffers, a collective that hangs when shards differ in size.
    model = unwrap(model)
    was_training = model.training
    model.eval()
    for batch in progress(worker_batches(loader), total=len(shard), desc="eval", unit="img", enabled=dist.is_main):
        logits = predict_logits(model, batch["image"].to(device), amp)
        if postprocess is not None:
            probs = torch.softmax(logits, dim=1)[0].cpu().numpy()
            pred = postprocess(int(batch["index"][0]), probs)
        else:
            pred = logits.argmax(dim=1)[0].cpu().numpy()
        conf += confusion_matrix(pred, batch["label"][0].numpy(), num_classes, IGNORE_INDEX)
    model.train(was_training)
    if dist.distributed:
        total = torch.from_numpy(conf).to(device)
        torch.distributed.all_reduce(total)
        conf = total.cpu().numpy()
    return iou_result(conf, class_names(config))


def iou_result(conf: np.ndarray, names: list[str]) -> dict:
    miou, iou = iou_from_confusion(conf)
    return {"mIoU": miou, "per_class_iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
            "confusion": conf.tolist()}


def format_iou(result: dict) -> str:
    lines = [f"mIoU: {100 * result['mIoU']:.2f}"]
    for name, value in result["per_class_iou"].items():
        lines.append(f"  {name:<14} {'-' if value is None else f'{100 * value:.2f}'}")
    return "\n".join(lines)


def load_trained_model(config: dict, checkpoint: str | os.PathLike, device: torch.device) -> nn.Module:
    """A DeepLab-v3 from a training checkpoint (`model_final.pth`), in eval mode on `device`.

    The architecture comes from the config stored in the checkpoint when there is one, else from `config`.
    """
    path = Path(checkpoint)
    state = read_torch_file(path, "model checkpoint")
    require_checkpoint_kind(state, path, (DEEPLAB_KIND, PROBE_KIND))
    weights = state.get("model", state)
    arch = json.loads(json.dumps(config))  # deep copy
    saved = state.get("config") if isinstance(state.get("config"), dict) else None
    if saved and "model" in saved:
        arch["model"] = dict(saved["model"])
        arch["data"]["num_classes"] = saved["data"]["num_classes"]
    arch["model"]["weights"] = "none"  # the checkpoint holds every weight
    model = build_from_config(arch)
    weights = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    problem = state_dict_mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(f"model checkpoint {path} does not fit the configured model: {problem}")
    model.load_state_dict(weights)
    return model.to(device).eval()
