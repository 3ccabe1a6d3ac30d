"""The PA predictor: forward shapes on the tiny backbone, GGN's loss by hand, the dataset's targets
on tiny_coco, padding, and checkpoint loading."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2_train.affinity import (AffinityDataset, affinity_loss, build_affinity_model, collate_affinity,
                                       load_affinity_model, predict_affinity, scaled_size)
from utils.affinity import instance_label_map, pairwise_affinity
from utils.checkpoint import save_checkpoint
from utils.coco_io import decode_segmentation, load_coco_dataset
from utils.errors import UserError

TINY = {"backbone": "tiny", "fpn_channels": 32, "head_channels": 16, "norm": "gn"}


def test_forward_gives_one_logit_per_pixel_and_trains_every_part():
    torch.manual_seed(0)
    model = build_affinity_model(TINY)
    assert model(torch.rand(2, 3, 64, 96)).shape == (2, 64, 96)
    logits = model(torch.rand(1, 3, 50, 70))  # not a multiple of the stride
    assert logits.shape == (1, 50, 70)
    logits.mean().backward()
    assert model.head.predict.weight.grad.abs().sum() > 0 and model.backbone.body.conv1.weight.grad.abs().sum() > 0
    pa = predict_affinity(model.eval(), torch.rand(3, 50, 70), min_size=40, max_size=100)
    assert pa.shape == (50, 70) and pa.dtype == np.float32 and 0 <= pa.min() and pa.max() <= 1
    with pytest.raises(UserError, match="head_norm"):
        build_affinity_model({**TINY, "head_norm": "ln"})


def test_the_stride_2_branch_predicts_every_pixel_and_every_parameter_learns():
    """model.fine_channels: a stride-2 prediction from image convolutions and the head's fused features. Every
    parameter gets a gradient (DistributedDataParallel refuses unused ones), so the head has no 1x1 predictor."""
    torch.manual_seed(0)
    model = build_affinity_model({**TINY, "fine_channels": 4})
    assert model.head.predict is None and model.fine.predict.in_channels == 4 + TINY["head_channels"]
    logits = model(torch.rand(2, 3, 50, 70))
    assert logits.shape == (2, 50, 70)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.fine.image[0].stride == (2, 2)
    with pytest.raises(RuntimeError, match="no prediction layer"):
        model.head([torch.rand(1, 32, 8, 8)] * 4)


def test_loss_by_hand_leaves_background_pairs_out_and_weights_positives():
    # At logit 0, BCE is log 2 per unit of weight: w * y * log 2 + (1 - y) * log 2, with w = 0.05.
    target = torch.tensor([[[1.0, 0.5, 0.0]], [[1.0, 1.0, 0.25]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]])
    logits = torch.zeros(2, 1, 3)
    logits[0, 0, 2] = 50.0  # a background-background pixel: no effect, however wrong
    log2 = math.log(2)
    image0 = (0.05 * log2 + (0.05 * 0.5 + 0.5) * log2) / 2
    image1 = (0.05 * log2 + (0.05 * 0.25 + 0.75) * log2) / 2
    assert affinity_loss(logits, target, mask).item() == pytest.approx((image0 + image1) / 2, rel=1e-6)
    assert affinity_loss(logits, target, mask, pos_weight=1.0).item() == pytest.approx(
        ((log2 + log2) / 2 + (log2 + log2) / 2) / 2, rel=1e-6)
    # An image without any object pixel adds 0 but still counts in the batch mean.
    empty = affinity_loss(logits, target, torch.stack([mask[0], torch.zeros(1, 3)]))
    assert empty.item() == pytest.approx(image0 / 2, rel=1e-6)


def test_dataset_targets_are_the_pa_of_the_seen_instances(tiny_coco):
    json_path = tiny_coco / "annotations" / "instances_train2017.json"
    gt = load_coco_dataset(json_path)
    dataset = AffinityDataset(json_path, tiny_coco / "train2017", category_ids=[1], min_sizes=(48, 64), max_size=96)
    with_person = {a["image_id"] for a in gt["annotations"] if a["category_id"] == 1 and not a.get("iscrowd", 0)}
    assert len(dataset) == len(with_person) and {img["id"] for img in dataset.images} <= with_person

    image, target = dataset[0]
    info = dataset.images[0]
    assert image.shape[1:] == scaled_size(info["height"], info["width"], 48, 96) == target["affinity"].shape
    persons = [a for a in gt["annotations"] if a["image_id"] == info["id"] and a["category_id"] == 1
               and not a.get("iscrowd", 0)]
    masks = torch.from_numpy(np.stack([decode_segmentation(a["segmentation"], info["height"], info["width"])
                                       for a in persons])).float()
    masks = F.interpolate(masks[None], size=image.shape[1:], mode="nearest")[0].numpy() > 0.5
    expected_pa, expected_mask = pairwise_affinity(instance_label_map(masks, *image.shape[1:]))
    assert np.array_equal(target["affinity"].numpy(), expected_pa)
    assert np.array_equal(target["loss_mask"].numpy(), expected_mask)
    assert 0 < expected_mask.mean() < 1 and target["image_id"] == info["id"]
    # The training scale is drawn from (seed, position): the same for the same position.
    sizes = [tuple(dataset[(0, p)][0].shape[1:]) for p in range(16)]
    assert set(sizes) == {scaled_size(info["height"], info["width"], s, 96) for s in (48, 64)}
    assert [tuple(dataset[(0, p)][0].shape[1:]) for p in (7, 8, 9)] == sizes[7:10]


def test_collate_pads_to_a_multiple_of_32_outside_the_loss():
    items = [(torch.ones(3, 40, 50), {"affinity": torch.ones(40, 50), "loss_mask": torch.ones(40, 50), "image_id": 1}),
             (torch.ones(3, 70, 20), {"affinity": torch.ones(70, 20), "loss_mask": torch.ones(70, 20), "image_id": 2})]
    images, targets = collate_affinity(items)
    assert images.shape == (2, 3, 96, 64) and targets["loss_mask"].shape == (2, 96, 64)
    assert targets["loss_mask"][0].sum() == 40 * 50 and targets["loss_mask"][1, 70:].sum() == 0
    assert images[1, :, :70, :20].min() == 1 and images[1, :, :, 20:].abs().sum() == 0
    assert targets["image_ids"] == [1, 2]


def test_checkpoint_round_trip_and_bad_checkpoints(tmp_path):
    torch.manual_seed(1)
    model = build_affinity_model(TINY).eval()
    path = tmp_path / "model_final.pth"
    save_checkpoint(path, model, iteration=10, config={"model": TINY, "input": {"min_size_test": 0}})
    loaded, config = load_affinity_model(path)
    image = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(image), model(image)) and config["input"] == {"min_size_test": 0}
    save_checkpoint(path, model, config={"model": {**TINY, "head_channels": 8}})
    with pytest.raises(UserError, match="does not fit"):
        load_affinity_model(path)
    torch.save({"model": {}}, path)
    with pytest.raises(UserError, match="'config'"):
        load_affinity_model(path)
