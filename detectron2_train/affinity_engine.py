"""Training of GGN's pairwise-affinity (PA) predictor: model, data and loss of detectron2_train/affinity.py
on the shared training loop (utils/training.py), and its score on held-back images.

SGD with linear warm-up and step decay as GGN (lr 0.02, momentum 0.9, weight decay 1e-4, warm-up
500 iterations from 0.001, one step x 0.1); AMP on GPU, DistributedDataParallel under torchrun,
checkpoints with an exact `--resume`, progress and metrics.jsonl come from the toolkit. The seen
classes (`data.seen_classes`, a class list such as make_split.py's A.txt) are the only instances
whose masks make the targets; the checkpoint keeps the config, so `load_affinity_model` and
gen_pa_masks.py rebuild the model and its test sizes from it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from detectron2_train.affinity import (AFFINITY_INPUT_DEFAULTS, AFFINITY_MODEL_DEFAULTS, PA_KIND, POSITIVE_WEIGHT,
                                       AffinityDataset, affinity_loss, build_affinity_model, collate_affinity,
                                       pad_images)
from detectron2_train.engine import lr_factor
from detectron2_train.parts import BACKBONES
from detectron2_train.splits import read_class_list
from utils.affinity import AffinityScores
from utils.checkpoint import unwrap
from utils.cli import float_range, int_range
from utils.coco_io import load_coco_dataset
from utils.config import ConfigSchema
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.progress import progress
from utils.samplers import resumable_loader
from utils.training import HARMLESS_KEYS, LoopSettings, TrainingRun, seed_all, split_batch

DEFAULTS = {
    "output_dir": "output/affinity",
    "data": {
        "train_json": None,  # COCO instances (e.g. COCO train2017); only data.seen_classes make targets
        "train_root": None,  # image root of train_json's file_name entries
        "seen_classes": None,  # class list file (names or ids, e.g. make_split.py's A.txt); null = every class
        "val_json": None,  # optional: held-back images scored during / after training (seen-class targets)
        "val_root": None,
        "num_workers": 2,
    },
    "input": AFFINITY_INPUT_DEFAULTS,
    "model": AFFINITY_MODEL_DEFAULTS,
    "loss": {
        "pos_weight": POSITIVE_WEIGHT,  # GGN's weight of the "same instance" term of the BCE
    },
    # GGN: SGD, lr 0.02, 8 images per batch, 20 epochs with a step at epoch 15; in iterations for the about
    # 87k images of COCO train2017 that hold a VOC-class object (3/4 of 118k, as on tiny_coco: 37 of 50)
    "solver": {
        "base_lr": 0.02,
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "warmup_iters": 500,
        "warmup_factor": 0.001,
        "steps": [165000],
        "gamma": 0.1,
        "max_iter": 220000,
        "ims_per_batch": 8,  # total over all processes
        "checkpoint_period": 5000,
        "keep_checkpoints": 0,  # periodic checkpoints kept (the newest); 0 = all
        "eval_period": 0,  # with data.val_json: score every N iterations; 0 = at the end only
        "clip_grad_norm": 0.0,  # 0 = no clipping
        "amp": True,  # mixed precision, GPU only
        "seed": 0,
        "log_period": 20,
    },
}

POSITIVE = float_range(0, min_inclusive=False)
SIZE = int_range(0)  # 0: the image's own size
SCHEMA = ConfigSchema(DEFAULTS, types={
    "data.train_json": str, "data.train_root": str, "data.seen_classes": str, "data.val_json": str,
    "data.val_root": str,
}, ranges={
    "data.num_workers": int_range(0),
    "input.min_size_train": SIZE, "input.max_size_train": SIZE, "input.min_size_test": SIZE,
    "input.max_size_test": SIZE, "input.hflip_prob": float_range(0, 1),
    "model.backbone": BACKBONES, "model.norm": ("frozen_bn", "bn", "gn"), "model.trainable_layers": int_range(0, 5),
    "model.tiny_widths": int_range(1), "model.fpn_channels": int_range(1), "model.head_channels": int_range(1),
    "model.head_norm": ("bn", "gn"), "model.fine_channels": int_range(0),
    "loss.pos_weight": POSITIVE,
    "solver.base_lr": POSITIVE, "solver.momentum": float_range(0, 1, max_inclusive=False),
    "solver.weight_decay": float_range(0), "solver.warmup_iters": int_range(0),
    "solver.warmup_factor": float_range(0, 1), "solver.steps": int_range(1), "solver.gamma": POSITIVE,
    "solver.max_iter": int_range(1), "solver.ims_per_batch": int_range(1), "solver.checkpoint_period": int_range(0),
    "solver.keep_checkpoints": int_range(0), "solver.eval_period": int_range(0),
    "solver.clip_grad_norm": float_range(0), "solver.seed": int_range(0), "solver.log_period": int_range(1),
})

FINAL_CHECKPOINT = "model_final.pth"
KIND = PA_KIND
# Keys a resumed training may change: the toolkit's, max_iter (the schedule does not depend on it) and
# what only inference or the held-back score reads.
RESUME_HARMLESS_KEYS = HARMLESS_KEYS + ("solver.max_iter", "data.val_json", "data.val_root", "input.*_test")


def seen_category_ids(cfg: dict, json_path: str) -> list[int] | None:
    """The category ids of data.seen_classes in `json_path`'s categories (None: every class)."""
    path = cfg["data"].get("seen_classes")
    if not path:
        return None
    return read_class_list(path, load_coco_dataset(json_path)["categories"])


def build_train_dataset(cfg: dict, seen: list[int] | None) -> AffinityDataset:
    data_cfg, input_cfg = cfg["data"], cfg["input"]
    for key in ("train_json", "train_root"):
        if not data_cfg.get(key):
            raise UserError(f"data.{key} is not set (use --{key} or --set data.{key}=...)")
    return AffinityDataset(data_cfg["train_json"], data_cfg["train_root"], category_ids=seen,
                           min_sizes=input_cfg["min_size_train"], max_size=input_cfg["max_size_train"],
                           flip_prob=input_cfg["hflip_prob"], seed=int(cfg["solver"]["seed"]))


def build_val_dataset(cfg: dict) -> AffinityDataset | None:
    """The held-back images at the test size, with the targets of the seen classes (None without data.val_json)."""
    data_cfg, input_cfg = cfg["data"], cfg["input"]
    if not data_cfg.get("val_json"):
        return None
    if not data_cfg.get("val_root"):
        raise UserError("data.val_json is set but data.val_root is not")
    return AffinityDataset(data_cfg["val_json"], data_cfg["val_root"], category_ids=seen_category_ids(cfg, data_cfg["val_json"]),
                           min_sizes=[input_cfg["min_size_test"]], max_size=input_cfg["max_size_test"])


@torch.no_grad()
def score_affinity(model: torch.nn.Module, dataset: AffinityDataset, info: DistInfo | None = None,
                   pos_weight: float = POSITIVE_WEIGHT, amp: bool = False) -> dict:
    """`AffinityScores.result()` of the model's PA maps on every image of `dataset` (at the dataset's scale),
    next to the best constant map. Each process scores its share; the figures are pooled over all."""
    info = info or DistInfo()
    model = unwrap(model)
    was_training = model.training
    model.eval()
    scores = AffinityScores(pos_weight)
    shard = range(info.rank, len(dataset), info.world_size)
    use_amp = amp and info.device.type == "cuda"
    for index in progress(shard, desc="PA score", unit="img", enabled=info.is_main):
        image, target = dataset[index]
        height, width = image.shape[1:]
        with torch.autocast(info.device.type, enabled=use_amp):
            logits = model(pad_images([image]).to(info.device))
        pa = torch.sigmoid(logits[0, :height, :width].float()).cpu().numpy()
        scores.add(pa, target["affinity"].numpy(), target["loss_mask"].numpy())
    model.train(was_training)
    if info.distributed:
        gathered: list = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, scores)
        scores = merge_scores(gathered)
    return scores.result()


def merge_scores(parts: list[AffinityScores]) -> AffinityScores:
    total = AffinityScores(parts[0].pos_weight, parts[0].bins)
    for part in parts:
        for name in ("pixels", "target_sum", "bce_sum", "weighted_bce_sum", "images"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.boundary_hist += part.boundary_hist
        total.interior_hist += part.interior_hist
    return total


def format_scores(scores: dict) -> str:
    return (f"held-back PA ({scores['images']} images): BCE {scores['bce']:.4f} (best constant "
            f"{scores['constant_bce']:.4f}), boundary F {scores['boundary_f']:.3f} (constant "
            f"{scores['constant_boundary_f']:.3f})")


def train(cfg: dict, info: DistInfo, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the PA predictor as configured; returns {"checkpoint", "scores" (held-back, {} without val data)}."""
    solver = cfg["solver"]
    per_process = split_batch(solver["ims_per_batch"], info.world_size, "solver.ims_per_batch")
    loop = LoopSettings.from_solver(solver, final_name=FINAL_CHECKPOINT, desc="train PA",
                                    nonfinite_hint="lower solver.base_lr or raise solver.warmup_iters")
    train_json = cfg["data"].get("train_json")
    seen = seen_category_ids(cfg, train_json) if train_json else None
    dataset = build_train_dataset(cfg, seen)
    val_dataset = build_val_dataset(cfg)
    seed_all(loop.seed)  # identical initial weights on every process
    model = build_affinity_model(cfg["model"]).to(info.device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=solver["base_lr"],
                                momentum=solver["momentum"], weight_decay=solver["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, solver))
    run = TrainingRun(cfg["output_dir"], model, optimizer, scheduler, loop, info, config=cfg,
                      fingerprint=fingerprint(KIND, cfg, RESUME_HARMLESS_KEYS),
                      extra={"seen_category_ids": seen, "world_size": info.world_size})
    run.prepare(resume, overwrite)
    loader = resumable_loader(dataset, per_process, loop.seed, info.rank, info.world_size, run.start_iter,
                              int(cfg["data"]["num_workers"]), collate_fn=collate_affinity,
                              pin_memory=info.device.type == "cuda")
    pos_weight = float(cfg["loss"]["pos_weight"])
    model.train()

    def step(model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        images, targets = batch
        logits = model(images.to(info.device, non_blocking=True))
        return {"loss_affinity": affinity_loss(logits, targets["affinity"].to(info.device),
                                               targets["loss_mask"].to(info.device), pos_weight)}

    def evaluate() -> dict:
        scores = score_affinity(model, val_dataset, info, pos_weight, bool(solver["amp"]))
        if info.is_main:
            print(format_scores(scores))
        return {f"val_{k}": v for k, v in scores.items()}

    final = run.train(step, loader, evaluate=evaluate if val_dataset is not None else None)
    evaluation = {k.removeprefix("val_"): v for k, v in (run.evaluation or {}).items()}
    return {"checkpoint": Path(final), "scores": evaluation}
