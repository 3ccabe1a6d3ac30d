"""The DeepLab-v3 configuration: every key a segmentation config may set, its schema, and the keys a
command must be given, and `run_settings`, a run's config from a file, overrides and the flags that set keys
(what the scripts and the pipeline both call). Torch-free, so that the scripts' `--help` stays quick
(segmentation/engine.py re-exports these names).
"""
from __future__ import annotations

from utils.cli import DEVICE_NAMES, float_range, int_range
from typing import Iterable

from utils.config import ConfigSchema, run_config
from utils.vit_settings import VIT_DEFAULTS, vit_schema_entries

BACKBONES = ("resnet50", "resnet101", "resnet18", "tiny", "vit")  # segmentation/model.py builds each

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
        "vit": dict(VIT_DEFAULTS),  # backbone vit: the ViT (utils/vit_settings.py); the map is at its patch stride
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
VIT_TYPES, VIT_RANGES = vit_schema_entries()
SCHEMA = ConfigSchema(DEFAULTS, types={
    "data.image_dir": str, "data.label_dir": str, "data.train_list": str, "data.val_image_dir": str,
    "data.val_label_dir": str, "data.val_list": str, "data.class_names": list[str], "model.atrous_rates": list[int],
    **VIT_TYPES,
}, ranges={
    **VIT_RANGES,
    "device": DEVICE_NAMES,
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




def run_settings(config: str, overrides: Iterable[str] = (), output_dir: str | None = None,
                 device: str | None = None) -> dict:
    """A DeepLab run's config: defaults < the YAML file < `overrides` (KEY=VALUE) < `output_dir` and `device` (the
    scripts' --output_dir and --device; None: the config's), each checked against `SCHEMA`."""
    return run_config(config, overrides, SCHEMA, {"output_dir": output_dir, "device": device})
