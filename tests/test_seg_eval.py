"""Validation mIoU against a hand-computed confusion matrix, and bad label files named in one clear error."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segmentation.data import EvalTransform, SegmentationDataset
from segmentation.engine import DEFAULTS, evaluate
from utils.errors import UserError
from utils.label_png import write_label_png

TARGET = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 255, 1],
                   [2, 2, 0, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1],
                 [0, 0, 1, 2],
                 [2, 2, 0, 1],
                 [0, 2, 0, 0]], dtype=np.uint8)


class FixedPrediction(nn.Module):
    """Stands in for a network: returns one-hot logits of PRED whatever the image."""

    def forward(self, images):
        onehot = torch.nn.functional.one_hot(torch.from_numpy(PRED).long(), 3).permute(2, 0, 1).float()
        return onehot[None].repeat(images.shape[0], 1, 1, 1)


def _set(tmp_path, label, image_size=(4, 4)):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((*image_size, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    write_label_png(tmp_path / "lab" / "a.png", label)
    return SegmentationDataset(tmp_path / "img", ["a"], tmp_path / "lab", 3, EvalTransform())


def _config():
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in DEFAULTS.items()}
    config["data"].update(num_classes=3, num_workers=0, class_names=["bg", "one", "two"])
    config["solver"]["amp"] = False
    return config


def test_miou_matches_hand_computed_confusion(tmp_path):
    result = evaluate(FixedPrediction(), _set(tmp_path, TARGET), _config())
    # Rows = target, columns = prediction, counted by hand over the 15 non-ignored pixels:
    # target 0 (6 px): 5 predicted 0, (0,1) predicted 1; target 1 (5 px): 4 right, (1,3) predicted 2;
    # target 2 (4 px): 3 right, (3,0) predicted 0; (2,2) is 255 and ignored.
    hand = [[5, 1, 0],
            [0, 4, 1],
            [1, 0, 3]]
    assert result["confusion"] == hand
    iou = [5 / (6 + 6 - 5), 4 / (5 + 5 - 4), 3 / (4 + 4 - 3)]  # tp / (row + column - tp)
    assert result["per_class_iou"] == pytest.approx(dict(zip(["bg", "one", "two"], iou)))
    assert result["mIoU"] == pytest.approx(np.mean(iou))


def test_label_size_mismatch_names_the_file(tmp_path):
    # Found from the file headers when the dataset is built, before any (long) training or evaluation.
    with pytest.raises(UserError, match=r"label file .*lab/a\.png is 4x4 but its image .*img/a\.png is 4x5"):
        _set(tmp_path, TARGET, image_size=(5, 4))
    # A label that goes bad after the dataset was built is still caught when it is read.
    dataset = _set(tmp_path, TARGET)
    write_label_png(tmp_path / "lab" / "a.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(UserError, match=r"lab/a\.png is 5x4 but its image"):
        evaluate(FixedPrediction(), dataset, _config())


def test_exif_rotated_image_is_compared_upright(tmp_path):
    """A JPEG stored 6x4 with EXIF 'rotate 90' is 4 wide and 6 high once loaded, like its label."""
    (tmp_path / "img").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "img" / "a.jpg", exif=exif)
    write_label_png(tmp_path / "lab" / "a.png", np.zeros((6, 4), np.uint8))
    dataset = SegmentationDataset(tmp_path / "img", ["a"], tmp_path / "lab", 3, EvalTransform())
    assert dataset[0]["label"].shape == (6, 4) and dataset[0]["image"].shape == (3, 6, 4)


def test_class_id_out_of_range_names_the_file(tmp_path):
    bad = TARGET.copy()
    bad[0, 0] = 7
    with pytest.raises(UserError, match=r"lab/a\.png has class id 7"):
        evaluate(FixedPrediction(), _set(tmp_path, bad), _config())


def test_missing_label_names_the_file(tmp_path):
    _set(tmp_path, TARGET)
    (tmp_path / "lab" / "a.png").unlink()
    with pytest.raises(UserError, match=r"label file not found: .*lab/a\.png"):
        SegmentationDataset(tmp_path / "img", ["a"], tmp_path / "lab", 3, EvalTransform())
    with pytest.raises(UserError, match=r"image for list entry 'zzz' not found"):
        SegmentationDataset(tmp_path / "img", ["zzz"], None, 3, EvalTransform())
