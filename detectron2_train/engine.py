"""Mask R-CNN training (model, data and loss; the loop is utils/training.py's), inference to COCO
results, and a quick COCO evaluation.

SGD with linear warm-up and step decay; AMP on GPU, DistributedDataParallel under torchrun,
checkpoints with an exact `--resume`, progress and metrics.jsonl come from the shared toolkit.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

from detectron2_train.copy_paste import CopyPaste
from detectron2_train.data import CocoInstances, categories_of, collate_lists, inference_loader
from detectron2_train.modeling import MODEL_DEFAULTS, build_model, set_image_sizes
from detectron2_train.parts import BACKBONES, MASK_HEADS, ROI_HEADS, STAGES
from detectron2_train.pseudo_gt import training_json
from detectron2_train.pseudo_labels import write_pseudo_labels
from detectron2_train.roi_heads import BOX_SCORES
from detectron2_train.transfer_head import TRANSFER_INPUTS
from detectron2_train.splits import read_class_list
from utils.checkpoint import latest_checkpoint, read_torch_file, require_checkpoint_kind, unwrap
from evaluation.coco_eval import EvalOptions, evaluate_predictions
from utils.coco_io import load_coco_dataset, load_json, make_annotation, reference_name, write_json
from utils.cli import float_range, int_range
from utils.config import ConfigSchema, save_config
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.progress import progress
from utils.samplers import resumable_loader, worker_batches
from utils.state_dicts import state_dict_mismatch
from utils.training import HARMLESS_KEYS, LoopSettings, TrainingRun, seed_all, split_batch
from utils.vit_settings import vit_schema_entries

DEFAULTS = {
    "output_dir": "output/mask_rcnn",
    "data": {
        "train_json": None,  # COCO dataset: pseudo-labels or ground truth
        "train_root": None,  # image root of train_json's file_name entries
        "test_json": None,  # optional: run inference (and a COCO evaluation) after training
        "test_root": None,
        "class_agnostic": False,  # train one 'object' class whatever the categories
        "filter_empty": False,  # drop images without instances (kept as negatives by default)
        "mask_classes": None,  # class list file (set A): only these classes train masks
        "seen_classes": None,  # class list file: train on these classes' annotations only (class-agnostic)
        "pseudo_json": None,  # GGN pseudo-masks (gen_pa_masks.py) added to the class-agnostic training set
        "pseudo_topk": 3,  # per image, the best pseudo-masks with IoU < 0.5 to every annotation (pseudo_gt.py)
        "num_workers": 2,
    },
    "input": {
        "min_size_train": [640, 672, 704, 736, 768, 800],  # shorter side, one drawn per batch
        "max_size_train": 1333,
        "min_size_test": 800,
        "max_size_test": 1333,
        "hflip_prob": 0.5,
        "copy_paste": {  # CutLER's copy-paste augmentation (copy_paste.py); rate 0 = off
            "rate": 0.0,  # probability that a training image receives pasted objects
            "min_ratio": 0.5,  # the source image is rescaled to ratio x the target's size,
            "max_ratio": 1.0,  # ratio drawn uniformly from [min_ratio, max_ratio]
            "random_num": True,  # paste 1..n-1 of the source's n objects (else all of them)
        },
    },
    "solver": {
        "base_lr": 0.02,
        "momentum": 0.9,
        "weight_decay": 1.0e-4,
        "warmup_iters": 1000,
        "warmup_factor": 0.001,
        "steps": [60000, 80000],
        "gamma": 0.1,
        "max_iter": 90000,
        "ims_per_batch": 16,  # total over all processes
        "checkpoint_period": 5000,
        "keep_checkpoints": 0,  # periodic checkpoints kept (the newest); 0 = all
        "clip_grad_norm": 0.0,  # 0 = no clipping
        "amp": True,  # mixed precision, GPU only
        "seed": 0,
        "log_period": 20,
    },
    "test": {
        "mask_thresh": 0.5,  # pixel threshold on the pasted mask probabilities
    },
    "model": MODEL_DEFAULTS,
}

# What a config may hold (utils.config): the types of keys that default to None, and the allowed values.
POSITIVE = float_range(0, min_inclusive=False)
VIT_TYPES, VIT_RANGES = vit_schema_entries()
SCHEMA = ConfigSchema(DEFAULTS, types={
    "data.train_json": str, "data.train_root": str, "data.test_json": str, "data.test_root": str,
    "data.mask_classes": str, "data.seen_classes": str, "data.pseudo_json": str, "model.transfer.embedding_file": str,
    **VIT_TYPES,
}, ranges={
    **VIT_RANGES,
    "data.num_workers": int_range(0), "data.pseudo_topk": int_range(1),
    "input.min_size_train": int_range(1), "input.max_size_train": int_range(1),
    "input.min_size_test": int_range(1), "input.max_size_test": int_range(1), "input.hflip_prob": float_range(0, 1),
    "solver.base_lr": POSITIVE, "solver.momentum": float_range(0, 1, max_inclusive=False),
    "solver.weight_decay": float_range(0), "solver.warmup_iters": int_range(0),
    "solver.warmup_factor": float_range(0, 1),
    "solver.steps": int_range(1), "solver.gamma": POSITIVE, "solver.max_iter": int_range(1),
    "solver.ims_per_batch": int_range(1), "solver.checkpoint_period": int_range(1),
    "solver.keep_checkpoints": int_range(0),
    "solver.clip_grad_norm": float_range(0), "solver.seed": int_range(0), "solver.log_period": int_range(1),
    "test.mask_thresh": float_range(0, 1),
    "model.backbone": BACKBONES, "model.mask_head": MASK_HEADS, "model.norm": ("frozen_bn", "bn", "syncbn", "gn"),
    "model.roi_heads": ROI_HEADS, "model.stage": STAGES, "model.cascade_ious": float_range(0, 1),
    "model.droploss_iou": float_range(0, 1), "model.rpn_nms_thresh": float_range(0, 1),
    "model.trainable_layers": int_range(0, 5), "model.tiny_widths": int_range(1), "model.fpn_channels": int_range(1),
    "model.anchor_sizes": int_range(1), "model.aspect_ratios": POSITIVE,
    "model.rpn_pre_nms_top_n_train": int_range(1), "model.rpn_post_nms_top_n_train": int_range(1),
    "model.rpn_pre_nms_top_n_test": int_range(1), "model.rpn_post_nms_top_n_test": int_range(1),
    "model.rpn_batch_size_per_image": int_range(1), "model.box_head_dim": int_range(1),
    "model.box_batch_size_per_image": int_range(1), "model.box_score_thresh": float_range(0, 1),
    "model.box_nms_thresh": float_range(0, 1), "model.detections_per_img": int_range(1),
    "model.box_score": BOX_SCORES,
    "model.mask_head_channels": int_range(1), "model.mask_head_convs": int_range(1),
    "model.mask_pool_size": int_range(1),
    "model.transfer.layers": int_range(1), "model.transfer.hidden_dim": int_range(1),
    "model.transfer.input": TRANSFER_INPUTS, "model.transfer.randn_dim": int_range(1),
    "model.transfer.activation": ("relu", "leaky_relu"),
    "input.copy_paste.rate": float_range(0, 1), "input.copy_paste.min_ratio": POSITIVE,
    "input.copy_paste.max_ratio": POSITIVE,
})

FINAL_CHECKPOINT = "model_final.pth"
# Keys a resumed training may change: besides the toolkit's, max_iter (the LR steps do not depend on it,
# so a run can be extended) and everything that only inference reads.
RESUME_HARMLESS_KEYS = HARMLESS_KEYS + ("solver.max_iter", "data.test_json", "data.test_root", "test.*",
                                        "input.*_test", "model.rpn_*_test", "model.box_score_thresh",
                                        "model.box_nms_thresh", "model.detections_per_img", "model.box_score",
                                        "model.vit.cache_dir")  # the cache changes no value (feature_cache.py)


def lr_factor(iteration: int, solver: dict) -> float:
    """Linear warm-up from warmup_factor to 1, then multiply by gamma at every step passed."""
    factor = solver["gamma"] ** sum(iteration >= s for s in solver["steps"])
    warmup = int(solver["warmup_iters"])
    if iteration < warmup:
        alpha = iteration / warmup
        factor *= solver["warmup_factor"] * (1 - alpha) + alpha
    return factor


def mask_labels(cfg: dict, categories: list[dict]) -> list[int] | None:
    """Contiguous labels of set A (from data.mask_classes), or None for full supervision."""
    path = cfg["data"].get("mask_classes")
    if not path:
        return None
    if cfg["data"]["class_agnostic"]:
        raise UserError("data.mask_classes (partial supervision) needs class-specific training, "
                        "not data.class_agnostic")
    ids = read_class_list(path, categories)
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    return [label_of[i] for i in ids]


def has_checkpoint(output_dir: Path) -> bool:
    """Whether --resume would find a checkpoint in `output_dir`."""
    return (output_dir / FINAL_CHECKPOINT).is_file() or latest_checkpoint(output_dir) is not None


def load_weights(model: torch.nn.Module, path: str, state: dict | None = None) -> dict:
    """Model weights from a training checkpoint (or a bare state dict); returns the checkpoint's extra."""
    state = read_torch_file(path, "weights") if state is None else state
    require_checkpoint_kind(state, path, ("mask_rcnn",))
    weights = state.get("model", state)
    if not isinstance(weights, dict):
        raise UserError(f"{path} holds no model state dict")
    try:  # the model's own rules (stage mask may leave a box stage's other mask head out)
        unwrap(model).load_state_dict(weights)
    except RuntimeError:
        problem = state_dict_mismatch(unwrap(model).state_dict(), weights) or "see the model's loading rules"
        raise UserError(f"weights {path} do not fit the configured model (check model.* and the "
                        f"number of classes): {problem}") from None
    return state.get("extra") or {}


def train(cfg: dict, info: DistInfo, resume: bool = False, overwrite: bool = False,
          init_weights: str | None = None) -> Path:
    """Train Mask R-CNN as configured (the loop is utils/training.py's); returns the final checkpoint's path."""
    solver, data_cfg = cfg["solver"], cfg["data"]
    for key in ("train_json", "train_root"):
        if not data_cfg.get(key):
            raise UserError(f"data.{key} is not set (use --{key} or --set data.{key}=...)")
    per_process = split_batch(solver["ims_per_batch"], info.world_size, "solver.ims_per_batch")
    loop = LoopSettings.from_solver(solver, final_name=FINAL_CHECKPOINT,
                                    nonfinite_hint="lower solver.base_lr or raise solver.warmup_iters")
    resumable = resume and has_checkpoint(Path(cfg["output_dir"]))
    if cfg["model"]["stage"] == "mask" and not init_weights and not resumable:
        raise UserError("model.stage mask trains the mask branch of a trained detector: pass --weights with the "
                        "box stage's checkpoint (model.stage box)")
    dataset = CocoInstances(training_json(cfg, info), data_cfg["train_root"],
                            class_agnostic=data_cfg["class_agnostic"], filter_empty=data_cfg["filter_empty"],
                            flip_prob=cfg["input"]["hflip_prob"], seed=loop.seed,
                            augment=CopyPaste.from_config(cfg["input"]["copy_paste"], loop.seed))
    if not dataset.num_objects():
        raise UserError(f"{dataset.json_path}: no object to train on in its {len(dataset)} images (crowd regions"
                        f"{', images without objects' if data_cfg['filter_empty'] else ''} and boxes under 1 px are "
                        "left out); check data.train_json, or lower --score_thresh of the round that made it")
    categories = dataset.categories
    mask_classes = mask_labels(cfg, categories)
    seed_all(loop.seed)  # identical initial weights on every process
    model = build_model(cfg, len(categories), mask_classes, [c["name"] for c in categories]).to(info.device)
    set_image_sizes(model, cfg, training=True)
    if init_weights:
        load_weights(model, init_weights)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=solver["base_lr"],
                                momentum=solver["momentum"], weight_decay=solver["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, solver))
    run = TrainingRun(cfg["output_dir"], model, optimizer, scheduler, loop, info, config=cfg,
                      fingerprint=fingerprint("mask_rcnn", cfg, RESUME_HARMLESS_KEYS, {"init_weights": init_weights}),
                      extra={"categories": categories, "mask_classes": mask_classes, "world_size": info.world_size})
    run.prepare(resume, overwrite)
    loader = resumable_loader(dataset, per_process, loop.seed, info.rank, info.world_size, run.start_iter,
                              int(data_cfg["num_workers"]), collate_fn=collate_lists)
    model.train()

    def step(model: torch.nn.Module, batch: tuple) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [img.to(info.device, non_blocking=True) for img in images]
        targets = [{k: (v.to(info.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        return model(images, targets)

    return run.train(step, loader)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: CocoInstances, categories: list[dict], info: DistInfo,
            mask_thresh: float = 0.5, num_workers: int = 0, amp: bool = False) -> list[dict]:
    """COCO results (RLE masks, xywh boxes, scores, dataset category ids) for every image of `dataset`.

    Each process predicts its share; rank 0 returns the gathered list (the others an empty one).
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    results: list[dict] = []
    loader = inference_loader(dataset, info.rank, info.world_size, num_workers)
    use_amp = amp and info.device.type == "cuda"
    for images, metas in progress(worker_batches(loader), total=len(loader), desc="inference", unit="img",
                                  enabled=info.is_main):
        with torch.autocast(info.device.type, enabled=use_amp):
            outputs = model([img.to(info.device) for img in images])
        for out, meta in zip(outputs, metas):
            masks = (out["masks"][:, 0] >= mask_thresh).cpu().numpy()
            boxes = out["boxes"].float().cpu().numpy()
            for mask, box, label, score in zip(masks, boxes, out["labels"].tolist(), out["scores"].tolist()):
                ann = make_annotation(mask, meta["image_id"], categories[label - 1]["id"], score)
                ann["bbox"] = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
                results.append(ann)
    model.train(was_training)
    if info.distributed:
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part] if info.is_main else []
    order = {img["id"]: i for i, img in enumerate(dataset.images)}
    results.sort(key=lambda r: (order[r["image_id"]], -r["score"]))
    return results


def coco_evaluate(gt_json: str, results: list[dict], class_agnostic: bool = False) -> dict:
    """Box and mask AP / AP50 / AP75 in percent (all categories merged when class_agnostic).

    A quick summary through evaluation/coco_eval.py; eval_instances.py gives the full report.
    """
    options = EvalOptions(iou_types=("bbox", "segm"), class_agnostic=class_agnostic)
    result = evaluate_predictions(results, load_coco_dataset(gt_json), options, "inference results", gt_json,
                                  agnostic_recall=False)
    # pycocotools' -1 (undefined: no GT object) reads as 0 here, as it always has in this summary.
    return {iou_type: {k: result.metrics[iou_type][k] or 0.0 for k in ("AP", "AP50", "AP75")}
            for iou_type in ("bbox", "segm")}


def run_inference(cfg: dict, info: DistInfo, weights: str, image_json: str, image_root: str,
                  results_path: Path, state: dict | None = None) -> list[dict]:
    """Load a trained model and write COCO results for the images of `image_json` (`state`: the checkpoint
    `weights` as `read_torch_file` gives it, when the caller has read it already)."""
    state = read_torch_file(weights, "weights") if state is None else state
    state_extra = state.get("extra") or {}
    categories = state_extra.get("categories")
    if categories is None:  # a bare state dict: fall back on the dataset's categories
        categories = categories_of(load_json(image_json, "COCO dataset"), cfg["data"]["class_agnostic"])
    model_cfg = copy.deepcopy(cfg)
    model_cfg["model"]["backbone_weights"] = "none"  # the checkpoint holds the whole model
    model = build_model(model_cfg, len(categories), state_extra.get("mask_classes"),
                        [c["name"] for c in categories]).to(info.device)
    load_weights(model, weights, state)
    del state
    set_image_sizes(model, cfg, training=False)
    dataset = CocoInstances(image_json, image_root, categories=categories, with_targets=False)
    results = predict(model, dataset, categories, info, cfg["test"]["mask_thresh"],
                      int(cfg["data"]["num_workers"]), bool(cfg["solver"]["amp"]))
    if info.is_main:
        write_json(results_path, results)
    barrier()
    return results


def run(cfg: dict, info: DistInfo, resume: bool = False, overwrite: bool = False, eval_only: bool = False,
        weights: str | None = None, pseudo_from: str | None = None, score_thresh: float = 0.7,
        pseudo_only: bool = False, results_path: str | None = None, evaluate: bool = True) -> None:
    """The whole job of train_net.py: [pseudo-labels] -> [training] -> [inference + COCO evaluation]."""
    output_dir = Path(cfg["output_dir"])
    if pseudo_from:
        if not cfg["data"].get("train_json"):
            raise UserError("--pseudo_from needs data.train_json: the dataset whose images get pseudo-labels")
        pseudo_path = output_dir / "pseudo_labels.json"
        if info.is_main:
            dataset = write_pseudo_labels(pseudo_from, cfg["data"]["train_json"], score_thresh, pseudo_path)
            print(f"wrote {len(dataset['annotations'])} pseudo-labels for {len(dataset['images'])} images "
                  f"to {pseudo_path}")
        barrier()
        cfg = copy.deepcopy(cfg)
        cfg["data"]["train_json"] = str(pseudo_path)
        if pseudo_only:
            return
    if eval_only:
        if not weights:
            raise UserError("--eval_only needs --weights (a checkpoint such as OUTPUT/model_final.pth)")
        if not cfg["data"].get("test_json"):
            raise UserError("--eval_only needs --test_json (or data.test_json): the images to predict; for a plain "
                            "folder of images, use predict.py --weights CKPT --images DIR --out OUT")
        final = Path(weights)
    else:
        final = train(cfg, info, resume=resume, overwrite=overwrite, init_weights=weights)
    test_json, test_root = cfg["data"].get("test_json"), cfg["data"].get("test_root")
    if not test_json:
        return
    if not test_root:
        raise UserError("data.test_json is set but data.test_root is not")
    results_file = Path(results_path) if results_path else output_dir / "inference" / "results.json"
    results = run_inference(cfg, info, str(final), test_json, test_root, results_file)
    if info.is_main:  # saved once the results are: a failed run leaves no inference folder behind
        save_config(cfg, results_file.parent / "config.yaml")
        print(f"wrote {len(results)} predictions to {results_file}")
        reference = load_coco_dataset(test_json)
        if evaluate and reference["annotations"]:
            summary = coco_evaluate(test_json, results, class_agnostic=cfg["data"]["class_agnostic"])
            write_json(results_file.parent / "coco_eval.json", summary, indent=2)
            against = f"{results_file} against {reference_name(reference, test_json)}"
            for iou_type, stats in summary.items():
                print(f"{iou_type} " + "  ".join(f"{k} {v:.1f}" for k, v in stats.items()) + f": {against}")
