"""Image list + label PNG datasets and train/eval transforms (training batches come from utils/samplers.py).

An image list names one image per line: its path relative to the image folder, with or without an
extension (VOC `train_aug.txt` style stems work, and so do SBD-style "image label" pairs: the first
column is used). Labels are `<label_dir>/<name>.png`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from utils.coco_io import read_text_lines
from utils.errors import UserError
from utils.images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_rgb, read_size
from utils.label_png import IGNORE_INDEX, check_label_values, read_label_png



def read_image_list(path: str | os.PathLike) -> list[str]:
    """Entries of an image list (blank lines and `#` comments skipped), extensions removed."""
    path = Path(path)
    names = []
    for line in read_text_lines(path, "image list"):  # names that are not UTF-8 too (gen_segmentation writes them)
        if line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) > 1:  # SBD/DeepLab style "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
            names.append(Path(fields[0]).stem)
            continue
        entry = fields[0].lstrip("/")
        names.append(str(Path(entry).with_suffix("")) if Path(entry).suffix.lower() in IMAGE_EXTENSIONS else entry)
    if not names:
        raise UserError(f"image list {path} is empty")
    return names


def find_image(image_dir: Path, name: str) -> Path:
    """`image_dir/name.<ext>` for the first image extension that exists."""
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        candidate = image_dir / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    raise UserError(f"image for list entry {name!r} not found in {image_dir} (tried {name}.jpg, .png, ...)")


def stored_size(path: Path, what: str = "image", exif_rotation: bool = True) -> tuple[int, int]:
    """(height, width) of a file from its header alone (`utils.images.read_size`), as a UserError
    naming the file when it cannot be read."""
    try:
        return read_size(path, exif_rotation)
    except ImageReadError as exc:
        if str(exc) == "file not found":
            raise UserError(f"{what} file not found: {path}") from None
        raise UserError(f"cannot read {what} file {path}: {exc}") from None


def check_pair_sizes(image_path: Path, label_path: Path, label_what: str = "label file") -> None:
    """Fail before any work when a label's size differs from its image's (headers only, so it is cheap)."""
    image_hw = stored_size(image_path, "image")
    label_hw = stored_size(label_path, "label", exif_rotation=False)
    if image_hw != label_hw:
        raise UserError(f"{label_what} {label_path} is {label_hw[1]}x{label_hw[0]} but its image {image_path} "
                        f"is {image_hw[1]}x{image_hw[0]}")


class SegmentationDataset(Dataset):
    """Images named by a list, with their label PNGs (or without labels, for prediction).

    Each item is a dict: `image` (3xHxW normalised float tensor), `label` (HxW int64, 255 = ignore;
    absent when there is no label folder), `index`. Missing files and label sizes that differ from
    their images are found when the dataset is built (from the file headers); class ids outside the range
    when an item loads. Every failure names the file.
    """

    def __init__(self, image_dir: str | os.PathLike, names: Sequence[str], label_dir: str | os.PathLike | None,
                 num_classes: int, transform: "TrainTransform | EvalTransform", seed: int = 0):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder not found: {self.image_dir}")
        self.names = list(names)
        self.images = [find_image(self.image_dir, n) for n in self.names]
        self.label_dir = Path(label_dir) if label_dir is not None else None
        self.labels: list[Path] | None = None
        if self.label_dir is not None:
            self.labels = [self.label_dir / f"{n}.png" for n in self.names]
            for image_path, path in zip(self.images, self.labels):
                if not path.is_file():
                    raise UserError(f"label file not found: {path}")
                check_pair_sizes(image_path, path)
        self.num_classes = num_classes
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The checked raw pair: HxWx3 uint8 image and HxW uint8 label (or None)."""
        path = self.images[index]
        try:
            image = np.array(load_rgb(path))
        except ImageReadError as exc:
            raise UserError(f"cannot read image {path}: {exc}") from None
        if self.labels is None:
            return image, None
        label_path = self.labels[index]
        label = read_label_png(label_path)
        if label.shape != image.shape[:2]:
            raise UserError(f"label file {label_path} is {label.shape[1]}x{label.shape[0]} but its image "
                            f"{path} is {image.shape[1]}x{image.shape[0]}")
        check_label_values(label, self.num_classes, label_path)
        return image, label

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        """Item `index`, or `(index, position)` from utils.samplers: the augmentation is drawn from
        (seed, position) alone, so a resumed run sees the same crops."""
        index, position = item if isinstance(item, tuple) else (item, item)
        image, label = self.load(index)
        rng = np.random.default_rng([self.seed, position])
        image_t, label_t = self.transform(image, label, rng)
        item = {"image": image_t, "index": index}
        if label_t is not None:
            item["label"] = label_t
        return item


def normalise(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float tensor with ImageNet statistics."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


class TrainTransform:
    """Random scale, pad (image with the mean colour, label with 255), random crop and horizontal flip."""

    def __init__(self, crop_size: int, scale_range: Sequence[float] = (0.5, 2.0), flip: bool = True):
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip

    def __call__(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        if label is None:
            raise ValueError("training needs labels")
        scale = rng.uniform(*self.scale_range)
        h, w = label.shape
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        crop = self.crop_size
        pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
        if pad_h or pad_w:
            mean_colour = [int(round(255 * m)) for m in IMAGENET_MEAN]
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=mean_colour)
            label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=IGNORE_INDEX)
        top = int(rng.integers(0, label.shape[0] - crop + 1))
        left = int(rng.integers(0, label.shape[1] - crop + 1))
        image = image[top:top + crop, left:left + crop]
        label = label[top:top + crop, left:left + crop]
        if self.flip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return normalise(image), torch.from_numpy(np.ascontiguousarray(label)).long()


class EvalTransform:
    """No geometric change: the network sees the full image and is scored at the label's resolution."""

    def __call__(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        label_t = torch.from_numpy(label.astype(np.int64)) if label is not None else None
        return normalise(image), label_t
