"""CutLER's self-training merge on hand-made masks: per-round thresholds, add-back at the IoU 0.5 boundary,
ids and categories, a valid COCO file; and train_net.py's flags for CutLER's rounds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detectron2_train.engine import DEFAULTS
from detectron2_train.pseudo_labels import add_back_previous, pseudo_label_dataset, write_pseudo_labels
from detectron2_train.self_training import RoundSettings
from detectron2_train.train_net import main, parse_args, round_settings
from utils.coco_io import load_coco_dataset, make_annotation, mask_to_rle, write_json
from utils.config import load_config
from utils.errors import UserError

CUTLER = Path(__file__).resolve().parents[1] / "configs" / "detectron2" / "cutler"
SIZE = 16


def _mask(rows: slice, cols: slice, drop: tuple[int, int] | None = None) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[rows, cols] = 1
    if drop is not None:
        mask[drop] = 0
    return mask


# A kept prediction covers rows 0-7, cols 0-7 (64 px). Against it:
SQUARE = _mask(slice(0, 8), slice(0, 8))
HALF = _mask(slice(0, 8), slice(0, 4))                      # IoU 32/64 = 0.5: not added back
HALF_MINUS_ONE = _mask(slice(0, 8), slice(0, 4), (0, 0))    # IoU 31/64 < 0.5: added back
FAR = _mask(slice(10, 16), slice(10, 16))                   # IoU 0: added back


def _files(tmp_path: Path, predictions: list[dict], previous: list[dict]) -> tuple[Path, Path, Path]:
    """images.json (4 images, two categories), results.json and previous.json (the earlier pseudo-masks)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": SIZE, "height": SIZE} for i in (1, 2, 3, 4)]
    categories = [{"id": 3, "name": "fg"}, {"id": 7, "name": "other"}]
    write_json(tmp_path / "images.json", {"images": images, "annotations": [], "categories": categories})
    write_json(tmp_path / "previous.json", {"images": images, "categories": categories, "annotations": [
        {**ann, "id": 100 + i} for i, ann in enumerate(previous)]})
    write_json(tmp_path / "results.json", predictions)
    return tmp_path / "results.json", tmp_path / "images.json", tmp_path / "previous.json"


def test_add_back_keeps_previous_masks_below_the_iou_threshold():
    kept = [make_annotation(SQUARE, 1, 3, 0.9)]
    previous = [make_annotation(m, 1, 3, 1.0) for m in (HALF, HALF_MINUS_ONE, FAR, SQUARE)]
    assert add_back_previous(kept, previous, 0.5) == previous[1:3]
    assert add_back_previous(kept, previous, 0.375) == previous[2:3]  # 31/64 = 0.484 is not below 0.375 either
    assert add_back_previous([], previous, 0.5) == previous            # nothing kept: every earlier mask stays
    assert add_back_previous(kept, [], 0.5) == []


def test_cutler_pseudo_labels_per_round_threshold_add_back_ids_and_categories(tmp_path):
    predictions = [
        make_annotation(SQUARE, 1, 3, 0.7),         # exactly the round-2 threshold: kept
        make_annotation(FAR, 1, 7, 0.68),           # kept in round 3 (0.65) only
        make_annotation(SQUARE, 2, 3, 0.5),         # below both: image 2 keeps all its earlier masks
        make_annotation(FAR, 3, 7, 0.95),           # image 3 had no earlier mask: the prediction only
        make_annotation(np.zeros((SIZE, SIZE), np.uint8), 3, 3, 0.99),  # empty: never a pseudo-label
    ]
    previous = [make_annotation(HALF, 1, 3), make_annotation(HALF_MINUS_ONE, 1, 7), make_annotation(FAR, 1, 3),
                make_annotation(HALF, 2, 3), make_annotation(FAR, 2, 7)]
    results, images, earlier = _files(tmp_path, predictions, previous)

    out = tmp_path / "round2" / "pseudo_labels.json"
    round2 = write_pseudo_labels(results, images, 0.7, out, earlier, 0.5)
    rows = [(a["image_id"], a["category_id"], a["score"], int(a["area"])) for a in round2["annotations"]]
    assert rows == [(1, 3, 0.7, 64),                   # the kept prediction, then what it does not cover:
                    (1, 7, 1.0, 31), (1, 3, 1.0, 36),  # HALF_MINUS_ONE and FAR (HALF, IoU 0.5, is dropped)
                    (2, 3, 1.0, 32), (2, 7, 1.0, 36),  # no kept prediction: both earlier masks
                    (3, 7, 0.95, 36)]                  # image 4: nothing, it stays as a negative
    assert [a["id"] for a in round2["annotations"]] == [1, 2, 3, 4, 5, 6]
    assert round2["categories"] == [{"id": 3, "name": "fg"}, {"id": 7, "name": "other"}]
    assert [img["id"] for img in round2["images"]] == [1, 2, 3, 4]
    assert round2["annotations"][1]["bbox"] == [0.0, 0.0, 4.0, 8.0] and round2["annotations"][2]["bbox"] == [
        10.0, 10.0, 6.0, 6.0]
    assert all(isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0 for a in round2["annotations"])
    loaded = load_coco_dataset(out)  # valid COCO, and what was returned
    assert loaded == round2
    from pycocotools.coco import COCO
    assert len(COCO(str(out)).getAnnIds()) == 6

    # Round 3: threshold 0.65, and the previous pseudo-masks are round 2's (the 0.68 prediction now covers FAR).
    round3 = pseudo_label_dataset(results, images, 0.65, out, 0.5)
    rows = [(a["image_id"], a["category_id"], a["score"], int(a["area"])) for a in round3["annotations"]]
    assert rows == [(1, 3, 0.7, 64), (1, 7, 0.68, 36), (1, 7, 1.0, 31),
                    (2, 3, 1.0, 32), (2, 7, 1.0, 36), (3, 7, 0.95, 36)]

    # Without add-back the paper's rule keeps the best prediction of image 2 and nothing earlier.
    plain = pseudo_label_dataset(results, images, 0.7)
    assert [(a["image_id"], a["score"]) for a in plain["annotations"]] == [(1, 0.7), (2, 0.5), (3, 0.95)]


def test_cutler_pseudo_labels_refuse_foreign_images_and_categories(tmp_path):
    results, images, earlier = _files(tmp_path, [make_annotation(SQUARE, 1, 3, 0.9)],
                                      [make_annotation(FAR, 1, 9)])
    with pytest.raises(UserError, match=r"previous\.json: annotation #0 has category_id 9 which is not in"):
        pseudo_label_dataset(results, images, 0.7, earlier, 0.5)
    write_json(tmp_path / "other.json", {"images": [{"id": 9, "file_name": "9.png", "width": SIZE, "height": SIZE}],
                                         "annotations": [{**make_annotation(FAR, 9, 3), "id": 1}], "categories": []})
    with pytest.raises(UserError, match=r"other\.json: annotation #0 has image_id 9 which is not in"):
        pseudo_label_dataset(results, images, 0.7, tmp_path / "other.json", 0.5)
    with pytest.raises(UserError, match="--add_back_iou must be in"):
        pseudo_label_dataset(results, images, 0.7, None, 0.5)


def test_train_net_flags_give_cutler_rounds(tmp_path):
    first, later = CUTLER / "cascade_mask_rcnn_r50.yaml", CUTLER / "cascade_mask_rcnn_r50_self_train.yaml"
    args = parse_args(["--config", str(first), "--round_config", str(later), "--rounds", "3", "--score_thresh",
                       "0.7", "0.65", "--add_back_iou", "0.5", "--init_from_previous", "--output_dir",
                       str(tmp_path), "--set", "solver.ims_per_batch=2", "--round_set", "3:solver.max_iter=5"])
    settings = round_settings(args)
    self_train = load_config(later, ["solver.ims_per_batch=2"], DEFAULTS)
    assert [(s.score_thresh, s.add_back_iou, s.init_from_previous, s.overrides) for s in settings] == [
        (0.7, 0.5, True, ()), (0.7, 0.5, True, ()), (0.65, 0.5, True, ("solver.max_iter=5",))]
    assert settings[0].config is None  # round 1 takes --config
    assert settings[1].config == settings[2].config == {**self_train, "output_dir": str(tmp_path)}
    assert not settings[1].config["model"]["droploss"] and settings[1].config["solver"]["ims_per_batch"] == 2
    for flag in (["--add_back_iou", "0.5"], ["--round_config", str(later)]):
        with pytest.raises(UserError, match=f"{flag[0]} needs --rounds"):
            main(["--config", str(first), *flag])
    assert RoundSettings().add_back_iou is None and RoundSettings().config is None
