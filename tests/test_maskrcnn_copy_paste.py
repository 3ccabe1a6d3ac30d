"""Copy-paste augmentation: pasted pixels, masks and boxes agree; occluded objects are updated or dropped."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2_train.copy_paste import CopyPaste, mask_boxes, paste_objects
from detectron2_train.data import CocoInstances
from tests.helpers.synthetic_shapes import make_dataset
from utils.errors import UserError

SIZE = 32


def _target(rects: list[tuple[int, int, int, int]], labels: list[int]) -> dict:
    """Masks of (y0, x0, y1, x1) rectangles; boxes as the dataset gives them (xyxy, pixel edges)."""
    masks = torch.zeros((len(rects), SIZE, SIZE), dtype=torch.uint8)
    for m, (y0, x0, y1, x1) in zip(masks, rects):
        m[y0:y1, x0:x1] = 1
    boxes = torch.tensor([[x0, y0, x1, y1] for y0, x0, y1, x1 in rects], dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "image_id": 7}


def _images():
    torch.manual_seed(0)
    return torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)


def test_paste_at_full_size_copies_source_pixels_masks_and_boxes():
    image, source = _images()
    target = _target([(2, 2, 10, 12)], [1])  # 80 px, partly covered below
    source_target = _target([(6, 8, 16, 20), (20, 20, 28, 30)], [2, 3])  # covers 4 x 4 = 16 px of it (20%)
    new_image, new = paste_objects(image, target, source, source_target, np.random.default_rng(0),
                                   min_ratio=1.0, max_ratio=1.0, random_num=False)
    pasted = source_target["masks"].bool()
    alpha = pasted.any(dim=0)
    assert torch.equal(new_image[:, alpha], source[:, alpha])  # pixels under a pasted mask are the source's
    assert torch.equal(new_image[:, ~alpha], image[:, ~alpha])  # the rest is untouched
    assert new["labels"].tolist() == [1, 2, 3] and new["image_id"] == 7
    assert torch.equal(new["masks"][1:].bool(), pasted)
    expected_existing = target["masks"][0].bool() & ~alpha
    assert torch.equal(new["masks"][0].bool(), expected_existing)
    # the occluded object keeps its box here (the covered corner does not change the extent)
    assert new["boxes"].tolist() == [[2, 2, 12, 10], [8, 6, 20, 16], [20, 20, 30, 28]]
    assert torch.equal(new["boxes"], mask_boxes(new["masks"]))
    assert new["masks"].dtype == torch.uint8


def test_occluded_masks_shrink_their_boxes_and_fully_hidden_objects_go():
    image, source = _images()
    # object 1 loses its right part (12 of 40 px, under half); object 2 (4 px) is covered by two pasted
    # objects of 2 px each: neither covers half of anything alone... together they hide it all
    target = _target([(0, 0, 4, 10), (20, 20, 22, 22)], [1, 1])
    source_target = _target([(0, 7, 8, 16), (20, 20, 21, 22), (21, 20, 22, 22)], [2, 2, 2])
    _, new = paste_objects(image, target, source, source_target, np.random.default_rng(0), 1.0, 1.0, False)
    # object 2 covered 50% by each pasted strip: the strips are not pasted (CutLER's rule), object 2 stays
    assert new["labels"].tolist() == [1, 1, 2]
    assert new["boxes"][0].tolist() == [0, 0, 7, 4]  # recomputed from the occluded mask
    assert torch.equal(new["boxes"], mask_boxes(new["masks"]))
    # four 1-px strips, each covering 25% of object 2, hide it completely: it is dropped
    source_target = _target([(0, 7, 8, 16)] + [(20 + i // 2, 20 + i % 2, 21 + i // 2, 21 + i % 2) for i in range(4)],
                            [2, 3, 3, 3, 3])
    _, new = paste_objects(image, target, source, source_target, np.random.default_rng(0), 1.0, 1.0, False)
    assert new["labels"].tolist() == [1, 2, 3, 3, 3, 3]
    assert len(new["masks"]) == len(new["boxes"]) == 6
    assert not new["masks"].flatten(1).sum(1).eq(0).any()


def test_object_covering_half_of_an_existing_one_is_not_pasted():
    image, source = _images()
    target = _target([(0, 0, 4, 4)], [1])
    source_target = _target([(0, 0, 2, 4)], [2])  # exactly half
    new_image, new = paste_objects(image, target, source, source_target, np.random.default_rng(0), 1.0, 1.0, False)
    assert new is target and new_image is image


def test_rescaled_paste_matches_the_resized_source():
    image, source = _images()
    target = _target([], [])
    source_target = _target([(4, 4, 20, 28)], [2])
    rng = np.random.default_rng(3)
    new_image, new = paste_objects(image, target, source, source_target, rng, 0.5, 0.5, random_num=True)
    # replay the draws: count (1 object), choice, ratio, offsets
    replay = np.random.default_rng(3)
    replay.choice(1, 1, replace=False)
    replay.uniform(0.5, 0.5)
    y0, x0 = int(replay.integers(0, SIZE - 16 + 1)), int(replay.integers(0, SIZE - 16 + 1))
    small = F.interpolate(source[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    small_mask = F.interpolate(source_target["masks"][None].float(), size=(16, 16), mode="bilinear",
                               align_corners=False)[0, 0] >= 0.5
    expected_mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected_mask[y0:y0 + 16, x0:x0 + 16] = small_mask
    assert torch.equal(new["masks"][0].bool(), expected_mask)
    assert new["boxes"].tolist() == [[x0 + 2, y0 + 2, x0 + 14, y0 + 10]]
    assert torch.equal(new_image[:, expected_mask], small[:, small_mask])


def test_random_number_of_pasted_objects_is_one_to_n_minus_one():
    image, source = _images()
    source_target = _target([(0, 0, 2, 2), (4, 4, 6, 6), (8, 8, 10, 10)], [1, 2, 3])
    counts = set()
    for seed in range(30):
        _, new = paste_objects(image, _target([], []), source, source_target, np.random.default_rng(seed), 1.0, 1.0)
        counts.add(len(new["labels"]))
    assert counts == {1, 2}


def test_dataset_hook_is_deterministic_per_position(tmp_path):
    data = make_dataset(tmp_path / "syn", num_images=4, seed=2)
    assert CopyPaste.from_config({"rate": 0.0, "min_ratio": 0.5, "max_ratio": 1.0, "random_num": True}, 0) is None
    hook = CopyPaste.from_config({"rate": 1.0, "min_ratio": 0.5, "max_ratio": 1.0, "random_num": False}, 0)
    dataset = CocoInstances(data, data.parent / "images", flip_prob=0.5, augment=hook)
    plain = CocoInstances(data, data.parent / "images", flip_prob=0.5)
    changed = 0
    for position in range(8):
        image, target = dataset[(position % 4, position)]
        again, target_again = dataset[(position % 4, position)]
        assert torch.equal(image, again) and torch.equal(target["masks"], target_again["masks"])
        assert torch.equal(target["boxes"], mask_boxes(target["masks"]))  # synthetic boxes are tight too
        base, base_target = plain[(position % 4, position)]
        changed += int(len(target["labels"]) > len(base_target["labels"]))
    assert changed >= 4
    # inference reads (index without position) are never augmented
    assert torch.equal(dataset[1][0], plain[1][0])
    with pytest.raises(UserError, match="min_ratio"):
        CopyPaste(1.0, min_ratio=0.8, max_ratio=0.5)
