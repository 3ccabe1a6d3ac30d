"""DeepLab-v3 training and evaluation loops: poly LR, ignore 255, AMP, DDP, exact resume, JSON-lines metrics."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from segmentation.data import (EvalTransform, SegmentationDataset, ShardedBatchSampler, TrainTransform,
                               read_image_list)
from segmentation.model import BACKBONES, build_from_config
from utils.checkpoint import latest_checkpoint, load_checkpoint, read_torch_file, save_checkpoint, unwrap
from utils.coco_io import write_text
from utils.cli import float_range, int_range
from utils.config import ConfigSchema, save_config
from utils.distributed import DistInfo, all_reduce_mean, barrier
from utils.errors import UserError
from utils.label_png import IGNORE_INDEX
from utils.metrics import confusion_matrix, iou_from_confusion
from utils.state_dicts import state_dict_mismatch
from utils.voc import VOC_SEGMENTATION_CLASSES

# Every key a segmentation config may set; YAML files and `--set` overrides change these.
DEFAULTS: dict = {
    "output_dir": "outputs/segmentation/deeplab",
    "device": "auto",
    "data": {
        "image_dir": None,          # training images
        "label_dir": None,          # pseudo-label PNGs (gen_segmentation.py output)
        "train_list": None,         # image list (train_aug style)
        "val_image_dir": None,      # defaults to image_dir
        "val_label_dir": None,      # ground-truth PNGs (VOC SegmentationClass)
        "val_list": None,           # null: no validation
        "num_classes": 21,
        "class_names": None,        # defaults to the VOC names when num_classes is 21
        "crop_size": 512,
        "scale_range": [0.5, 2.0],
        "flip": True,
        "num_workers": 4,
    },
    "model": {
        "backbone": "resnet50",
        "output_stride": 8,
        "weights": "none",          # none | imagenet | path to an ImageNet/DINO/MoCo ResNet checkpoint
        "head_channels": 256,
        "atrous_rates": None,       # default [12, 24, 36] at output stride 8
    },
    "solver": {
        "batch_size": 16,           # total over all processes
        "max_iter": 30000,
        "base_lr": 0.01,
        "head_lr_mult": 1.0,
        "momentum": 0.9,
        "weight_decay": 0.0001,
        "poly_power": 0.9,
        "amp": True,                # only on CUDA
        "sync_bn": True,            # only with several CUDA processes
        "checkpoint_period": 2000,  # 0: only model_final.pth
        "keep_checkpoints": 3,
        "eval_period": 0,           # 0: evaluate at the end only
        "log_period": 20,
        "seed": 0,
    },
    "crf_rounds": {
        "rounds": 1,                # train_plus_crf.py: refinement rounds after the first training
    },
}

# What a config may hold (utils.config): the types of keys that default to None, and the allowed values.
POSITIVE = float_range(0, min_inclusive=False)
SCHEMA = ConfigSchema(DEFAULTS, types={
    "data.image_dir": str, "data.label_dir": str, "data.train_list": str, "data.val_image_dir": str,
    "data.val_label_dir": str, "data.val_list": str, "data.class_names": list[str], "model.atrous_rates": list[int],
}, ranges={
    "data.num_classes": int_range(1), "data.crop_size": int_range(1), "data.scale_range": POSITIVE,
    "data.num_workers": int_range(0),
    "model.backbone": BACKBONES, "model.output_stride": (8, 16, 32), "model.head_channels": int_range(1),
    "model.atrous_rates": int_range(1),
    "solver.batch_size": int_range(1), "solver.max_iter": int_range(1), "solver.base_lr": POSITIVE,
    "solver.head_lr_mult": POSITIVE, "solver.momentum": float_range(0, 1, max_inclusive=False),
    "solver.weight_decay": float_range(0), "solver.poly_power": float_range(0),
    "solver.checkpoint_period": int_range(0),
    "solver.keep_checkpoints": int_range(0), "solver.eval_period": int_range(0), "solver.log_period": int_range(1),
    "solver.seed": int_range(0),
    "crf_rounds.rounds": int_range(0),
})
# The keys a training / validation config must set (listed by --help), and a command that runs as it stands.
TRAIN_KEYS = {"data.image_dir": "training images", "data.label_dir": "their label PNGs (gen_segmentation.py --out_dir)",
              "data.train_list": "image list of the training set",
              "data.val_list": "optional: val image list (null: no validation)",
              "data.val_label_dir": "with data.val_list: ground-truth PNGs (VOC SegmentationClass)"}
VAL_KEYS = {"data.val_list": "val image list", "data.val_label_dir": "ground-truth PNGs (VOC SegmentationClass)",
            "data.val_image_dir": "val images (default: data.image_dir)"}
_VOC_MINI = "../shared/data/voc_mini/VOCdevkit/VOC2012"
TINY_EXAMPLE = ("python {script} --config configs/segmentation/tiny_test.yml "
                f"--set data.image_dir={_VOC_MINI}/JPEGImages data.label_dir={_VOC_MINI}/SegmentationClass "
                f"data.train_list={_VOC_MINI}/ImageSets/Segmentation/trainval.txt")


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


def build_train_dataset(config: dict, label_dir: str | os.PathLike | None = None) -> SegmentationDataset:
    _require(config, "image_dir", "train_list")
    d = config["data"]
    label_dir = label_dir or d.get("label_dir")
    if not label_dir:
        raise UserError("config key data.label_dir is not set")
    return SegmentationDataset(d["image_dir"], read_image_list(d["train_list"]), label_dir, int(d["num_classes"]),
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


def worker_batches(loader: Iterable) -> Iterator:
    """Iterate a DataLoader, turning a UserError raised in a worker back into its own one-line message."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            message = str(exc)
            if "Original Traceback" in message:  # DataLoader wraps the worker's traceback into the message
                lines = [ln for ln in message.splitlines() if "UserError: " in ln]
                message = lines[-1].split("UserError: ", 1)[1] if lines else message.splitlines()[0]
            raise UserError(message) from None
        yield batch


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, iteration: int) -> None:
    """On resume, drop records written after the checkpoint so the log reads like one straight run."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("iteration", 0) <= iteration]
    write_text(path, "".join(ln + "\n" for ln in kept))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    periodic = sorted(p for p in output_dir.glob("model_*.pth") if p.stem[6:].isdigit())
    for old in periodic[:-keep]:
        old.unlink(missing_ok=True)


def train(config: dict, dist: DistInfo, resume: bool = False, overwrite: bool = False,
          label_dir: str | os.PathLike | None = None) -> dict:
    """Train DeepLab-v3 as the config says; returns {"iteration", "checkpoint", "metrics" (last eval or {})}."""
    solver, d = config["solver"], config["data"]
    output_dir = Path(config["output_dir"])
    if output_dir.exists() and any(output_dir.glob("model_*.pth")) and not (resume or overwrite):
        raise UserError(f"{output_dir} already holds checkpoints; pass --resume to continue or --overwrite to restart")
    world = dist.world_size
    if int(solver["batch_size"]) % world:
        raise UserError(f"solver.batch_size {solver['batch_size']} is not divisible by the {world} processes")
    per_rank_batch = int(solver["batch_size"]) // world
    if per_rank_batch < 2:
        raise UserError("each process needs a batch of at least 2 images (BatchNorm); raise solver.batch_size")
    _seed_everything(int(solver["seed"]) + dist.rank)

    dataset = build_train_dataset(config, label_dir)
    val_dataset = build_val_dataset(config)
    sampler = ShardedBatchSampler(len(dataset), per_rank_batch, dist.rank, world, int(solver["seed"]))
    # A private generator keeps the DataLoader from drawing on the global RNG (which checkpoints restore).
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(d["num_workers"]),
                        pin_memory=dist.device.type == "cuda", generator=torch.Generator())

    device = dist.device
    model = build_from_config(config).to(device)
    if dist.distributed and device.type == "cuda" and solver.get("sync_bn", True):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    max_iter = int(solver["max_iter"])
    optimizer = build_optimizer(model, solver)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(max_iter, float(solver["poly_power"])))
    amp = bool(solver["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_iter = 0
    metrics_path = output_dir / "metrics.jsonl"
    if overwrite and dist.is_main and output_dir.exists():
        for old in list(output_dir.glob("model_*.pth")) + [metrics_path]:
            old.unlink(missing_ok=True)
    barrier()
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, restore_rng=True)
        if state.get("extra", {}).get("scaler") and amp:
            scaler.load_state_dict(state["extra"]["scaler"])
        start_iter = int(state["iteration"])
        if dist.rank:  # the checkpoint holds rank 0's RNG; give the other ranks their own stream again
            _seed_everything(int(solver["seed"]) * 7919 + dist.rank * 104729 + start_iter)
        if dist.is_main:
            print(f"resuming from {checkpoint} at iteration {start_iter}")
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        if checkpoint is not None:
            truncate_metrics(metrics_path, start_iter)
    if dist.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    iteration = start_iter
    last_eval: dict = {}
    progress = tqdm(total=max_iter, initial=start_iter, desc="train", unit="it", disable=None if dist.is_main else True)
    model.train()
    tick = time.perf_counter()
    while iteration < max_iter:
        epoch, offset = divmod(iteration, sampler.iters_per_epoch)
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, offset)
        for batch in worker_batches(loader):
            data_time = time.perf_counter() - tick
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(images)
            loss = segmentation_loss(logits, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration + 1}; lower solver.base_lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            progress.update(1)
            log_now = iteration % int(solver["log_period"]) == 0 or iteration == max_iter
            if log_now:
                mean_loss = all_reduce_mean(loss.detach()).item()
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if dist.is_main:
                    record = {"iteration": iteration, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                              "data_time": round(data_time, 4), "time": round(time.perf_counter() - tick, 4)}
                    if device.type == "cuda":
                        record["max_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    _append_jsonl(metrics_path, record)
            period = int(solver["checkpoint_period"])
            if dist.is_main and (iteration == max_iter or (period > 0 and iteration % period == 0)):
                path = output_dir / f"model_{iteration:07d}.pth"
                save_checkpoint(path, model, optimizer, scheduler, iteration, config,
                                extra={"scaler": scaler.state_dict() if amp else None})
                prune_checkpoints(output_dir, int(solver["keep_checkpoints"]))
            eval_period = int(solver["eval_period"])
            if val_dataset is not None and eval_period > 0 and iteration % eval_period == 0 and iteration < max_iter:
                last_eval = _evaluate_and_log(model, val_dataset, config, dist, iteration, metrics_path)
                model.train()
            tick = time.perf_counter()
            if iteration >= max_iter:
                break
    progress.close()
    final = output_dir / "model_final.pth"
    if dist.is_main:
        save_checkpoint(final, model, None, None, iteration, config)
    barrier()
    if val_dataset is not None:
        last_eval = _evaluate_and_log(model, val_dataset, config, dist, iteration, metrics_path)
    return {"iteration": iteration, "checkpoint": str(final), "metrics": last_eval}


def _evaluate_and_log(model, val_dataset, config, dist, iteration, metrics_path) -> dict:
    result = evaluate(model, val_dataset, config, dist)
    if dist.is_main:
        _append_jsonl(metrics_path, {"iteration": iteration, "mIoU": result["mIoU"],
                                     "per_class_iou": result["per_class_iou"]})
        print(format_iou(result))
    return result


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
    for batch in tqdm(worker_batches(loader), total=len(shard), desc="eval", unit="img",
                      disable=None if dist.is_main else True):
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
