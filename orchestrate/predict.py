"""Predict with a trained Mask R-CNN on a plain folder of images: no hand-made COCO file needed.

`predict_folder` lists the folder's images (recursively, sorted by path), numbers them 1..N in that order and
writes, under the output folder:
  images.json       the images as a COCO dataset (id, file_name relative to the folder, height, width) and the
                    model's categories: what the ids of results.json mean (also a train_net.py --test_json)
  results.json      the predictions as a COCO results list (image_id, category_id, RLE segmentation, bbox,
                    score), best first per image
  predictions.json  the same predictions as a COCO dataset naming its images, as gen_masks.py writes: every
                    tool (eval_instances.py, eval_corloc.py, make_gallery.py, utils/cluster.py) matches it to a
                    ground truth by file_name, whatever that GT's ids
  config.yaml       the model's config as used
  gallery/          one HTML page of every image with its masks (make_gallery.py's page)
Everything is checked before any work (weights of the right kind, the folder, the outputs); files are written
atomically. Images whose header cannot be read are skipped and named.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from detectron2_train.data import categories_of
from detectron2_train.engine import SCHEMA, run_inference
from distill.gallery import build_gallery
from utils.checkpoint import read_torch_file, require_checkpoint_kind
from utils.cli import check_outputs
from utils.coco_io import write_json
from utils.config import load_config, save_config
from utils.distributed import distributed_session
from utils.errors import UserError
from utils.images import ImageReadError, list_images, read_size

OUTPUT_FILES = ("images.json", "results.json", "predictions.json", "config.yaml", "gallery/index.html")


@dataclass(frozen=True)
class PredictSettings:
    """What `predict.py` asks for (see its --help)."""

    weights: str
    images: str
    out: str
    score_thresh: float | None = 0.5  # None: the model config's model.box_score_thresh
    config: str | None = None  # None: the config recorded in the checkpoint
    max_images: int = 0  # 0: all
    gallery: bool = True
    device: str = "auto"
    overwrite: bool = False


def folder_images(root: Path, max_images: int) -> tuple[list[dict], list[dict]]:
    """(COCO images of the folder, ids 1..N in path order; the files skipped, with why). Sizes come from the
    headers, as the images will be read (EXIF rotation applied)."""
    files = list_images(root)
    if max_images:
        files = files[:max_images]
    images, skipped = [], []
    for name in files:
        try:
            height, width = read_size(root / name)
        except ImageReadError as exc:
            skipped.append({"file_name": name, "reason": str(exc)})
            continue
        images.append({"id": len(images) + 1, "file_name": name, "height": height, "width": width})
    if not images:
        reason = f" ({len(skipped)} unreadable, e.g. {skipped[0]['file_name']})" if skipped else ""
        raise UserError(f"no readable image under {root}{reason}")
    return images, skipped


def model_config(settings: PredictSettings, state: dict) -> dict:
    """The config to build the model from: --config, else the one the checkpoint records; with the score
    threshold of the predictions applied."""
    if settings.config:
        cfg = load_config(settings.config, [], SCHEMA)
    elif isinstance(state.get("config"), dict):
        cfg = copy.deepcopy(state["config"])
    else:
        raise UserError(f"{settings.weights} records no config (a bare state dict): pass --config, the YAML the "
                        "model was trained with")
    if settings.score_thresh is not None:
        cfg["model"]["box_score_thresh"] = settings.score_thresh
    return cfg


def predict_folder(settings: PredictSettings) -> dict:
    """Predict every image of `settings.images` with the Mask R-CNN of `settings.weights` and write the files
    of the module docstring under `settings.out`. Returns {"images", "predictions", "skipped"} counts."""
    root, out = Path(settings.images), Path(settings.out)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    if settings.score_thresh is not None and not 0.0 <= settings.score_thresh <= 1.0:
        raise UserError(f"--score_thresh must be in [0, 1], got {settings.score_thresh}")
    outputs = [out / name for name in OUTPUT_FILES if settings.gallery or not name.startswith("gallery/")]
    check_outputs(*outputs, overwrite=settings.overwrite)
    state = read_torch_file(settings.weights, "weights", hint="a train_net.py checkpoint such as OUT/model_final.pth")
    require_checkpoint_kind(state, settings.weights, ("mask_rcnn",))
    cfg = model_config(settings, state)
    images, skipped = folder_images(root, settings.max_images)
    extra = state.get("extra") or {}
    categories = extra.get("categories") or categories_of({"categories": []}, cfg["data"]["class_agnostic"])
    dataset = {"info": {"description": f"images of {root}, numbered 1..N in path order (predict.py)"},
               "images": images, "annotations": [], "categories": categories}
    write_json(out / "images.json", dataset)
    with distributed_session(settings.device) as info:
        results = run_inference(cfg, info, settings.weights, str(out / "images.json"), str(root),
                                out / "results.json", state=state)
    del state
    save_config(cfg, out / "config.yaml")
    annotations = [{**r, "id": i + 1} for i, r in enumerate(results)]
    settings_record = {"weights": str(settings.weights), "score_thresh": cfg["model"]["box_score_thresh"],
                       "config": settings.config or "recorded in the checkpoint"}
    write_json(out / "predictions.json", {
        "info": {"description": "Mask R-CNN predictions (predict.py)", "settings": settings_record},
        "images": images, "annotations": annotations, "categories": categories, "skipped_images": skipped})
    if settings.gallery:
        build_gallery(out / "gallery", root, [str(out / "predictions.json")], labels=["Mask R-CNN"],
                      title=f"Mask R-CNN {Path(settings.weights).name} on {root}", overwrite=settings.overwrite)
    return {"images": len(images), "predictions": len(annotations), "skipped": skipped}
