"""The pipeline's settings (`pipeline.py`'s flags, typed), and the clustering settings that both the cluster
stage and the evaluation build from them: a module of its own, so that orchestrate/pipeline.py,
orchestrate/evaluate.py and orchestrate/report.py import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARCH = "vit_small"  # gen_masks.py's --arch default: the masks step's record names --arch only when another
BACKBONES = ("resnet", "vit")  # of the trained stages (pipeline.py --backbone)
AUTO_BACKBONE = "auto"  # pipeline.py's default: `backbone_for` decides
NAMED_WEIGHTS = ("dino", "random")  # --weights values that name no file: the official checkpoint, random weights


def is_weights_file(weights: str | None) -> bool:
    """Whether --weights names a checkpoint file rather than one of NAMED_WEIGHTS (or is left out)."""
    return weights is not None and weights not in NAMED_WEIGHTS


def backbone_for(backbone: str, weights: str | None) -> str:
    """--backbone auto: "vit" when --weights names a checkpoint file (then the one real checkpoint the run has
    trains every stage, as discovery uses it), else "resnet" (the ResNet recipes, their own weights)."""
    if backbone != AUTO_BACKBONE:
        return backbone
    return "vit" if is_weights_file(weights) else "resnet"


@dataclass
class PipelineSettings:
    """Everything `pipeline.py` takes (its --help explains each)."""

    images: str
    out: str
    method: str = "maskdistill"
    gt_json: str | None = None
    tiny: bool = False
    num_classes: int | None = None  # default 20, TINY_NUM_CLASSES with --tiny
    weights: str | None = None  # gen_masks.py --weights (default: the official DINO; --tiny: random)
    arch: str = DEFAULT_ARCH  # gen_masks.py --arch; with backbone "vit" also the detector's and DeepLab's model.vit.arch
    backbone: str = "resnet"  # "resnet": the ResNet recipes; "vit": every stage on the arch/weights checkpoint
    self_training_rounds: int = 2
    score_thresh: float = 0.7
    crf_rounds: int = 1
    label_threshold: float = 0.5
    device: str = "auto"
    overwrite: bool = False  # replace the results of other settings in `out` (e.g. another --method)
    exclude: tuple[str, ...] = ()  # images (relative to `images`) left out of the run: set by `check_settings`


def cluster_settings(s: PipelineSettings, masks: str, output_file: Path, gt_file: str | None = None):
    """The clustering of `masks`. The crop features are cached next to the masks (OUT/masks/), keyed by
    content: a rerun of the clustering with other settings, and the evaluation's, reuse them."""
    from distill.cluster import ClusterSettings

    return ClusterSettings(input_file=masks, image_root=str(Path(s.images).resolve()),
                           output_file=str(output_file), num_classes=s.num_classes, gt_file=gt_file,
                           overwrite=True, device=s.device,
                           num_workers=0 if s.tiny else 2)
