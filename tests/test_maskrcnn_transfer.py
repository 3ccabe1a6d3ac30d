"""MaskX R-CNN transfer head and partial mask supervision."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from detectron2_train.engine import DEFAULTS
from detectron2_train.modeling import build_model
from detectron2_train.roi_heads import partial_mask_loss
from detectron2_train.splits import VOC_CLASSES_IN_COCO, random_split, read_class_list, voc_split
from detectron2_train.transfer_head import (AgnosticMLPMaskPredictor, TransferMaskPredictor, class_embeddings,
                                            random_class_vectors, read_class_embeddings)
from utils.config import load_config
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "detectron2" / "tiny_test.yaml"
NUM_CLASSES = 3  # foreground labels 1..3; set A = {1}, set B = {2, 3}


def transfer_model(grad: bool = False, layers: int = 2, kind: str = "cls+box", mask_classes=(1,)):
    torch.manual_seed(0)
    cfg = load_config(TINY, [], DEFAULTS)
    cfg["model"]["mask_head"] = "transfer"
    cfg["model"]["transfer"].update(grad=grad, layers=layers, input=kind)
    return build_model(cfg, NUM_CLASSES, list(mask_classes) if mask_classes is not None else None)


def images_and_targets(label: int, n: int = 2):
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64) for _ in range(n)]
    targets = []
    for _ in range(n):
        masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
        masks[0, 12:40, 16:44] = 1
        targets.append({"boxes": torch.tensor([[16.0, 12.0, 44.0, 40.0]]), "labels": torch.tensor([label]),
                        "masks": masks})
    return images, targets


def mask_loss_grads(model, label: int):
    model.train()
    images, targets = images_and_targets(label)
    torch.manual_seed(2)
    loss = model(images, targets)["loss_mask"]
    box_predictor = model.roi_heads.box_predictor
    det = [box_predictor.cls_score.weight, box_predictor.bbox_pred.weight]
    transfer = list(model.roi_heads.mask_predictor.weight_transfer.parameters())
    grads = torch.autograd.grad(loss, det + transfer, allow_unused=True)
    return loss, grads[:2], grads[2:]


def _nonzero(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_stop_gradient_keeps_mask_loss_off_box_weights():
    loss, det_grads, transfer_grads = mask_loss_grads(transfer_model(grad=False), label=1)
    assert loss > 0
    assert not _nonzero(det_grads)
    assert _nonzero(transfer_grads)  # the loss does train T


def test_transfer_grad_lets_mask_loss_reach_box_weights():
    loss, det_grads, _ = mask_loss_grads(transfer_model(grad=True), label=1)
    assert loss > 0
    assert _nonzero(det_grads)


def test_class_only_in_set_b_contributes_zero_mask_loss():
    model = transfer_model(grad=True)
    loss_b, det_grads, transfer_grads = mask_loss_grads(model, label=2)
    assert loss_b.item() == 0.0
    assert not _nonzero(det_grads) and not _nonzero(transfer_grads)
    all_mask_params = [p for n, p in model.named_parameters() if n.startswith(("roi_heads.mask", "roi_heads.mask_predictor"))]
    model.train()
    images, targets = images_and_targets(2)
    grads = torch.autograd.grad(model(images, targets)["loss_mask"], all_mask_params, allow_unused=True)
    assert not _nonzero(grads)
    # fully supervised, the same class does train masks: the zero above is the masking, not the data
    full = transfer_model(grad=True, mask_classes=None)
    loss_full, _, _ = mask_loss_grads(full, label=2)
    assert loss_full > 0


def test_partial_mask_loss_ignores_set_b_rois():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, 8, 8)
    targets = (torch.rand(4, 8, 8) > 0.5).float()
    labels = torch.tensor([1, 2, 1, 3])
    supervised = torch.tensor([False, True, False, False])  # A = {1}
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 2], [1, 1]], targets[[0, 2]])
    assert torch.allclose(partial_mask_loss(logits, labels, targets, supervised), expected)
    # changing set-B targets changes nothing
    targets2 = targets.clone()
    targets2[[1, 3]] = 1 - targets2[[1, 3]]
    assert torch.allclose(partial_mask_loss(logits, labels, targets2, supervised), expected)
    # all supervised: torchvision's loss
    allsup = torch.ones(4, dtype=torch.bool)
    tv = torch.nn.functional.binary_cross_entropy_with_logits(logits[torch.arange(4), labels], targets)
    assert torch.allclose(partial_mask_loss(logits, labels, targets, allsup), tv)
    # class-agnostic logits use channel 0
    agn = partial_mask_loss(logits[:, :1], labels, targets, allsup)
    assert torch.allclose(agn, torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets))


def test_set_b_classes_get_masks_at_inference_from_their_box_weights():
    model = transfer_model()
    model.eval()
    heads = model.roi_heads
    torch.manual_seed(3)
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        images_t, _ = model.transform(images)
        features = model.backbone(images_t.tensors)
        boxes = [torch.tensor([[10.0, 10.0, 40.0, 40.0], [20.0, 5.0, 60.0, 30.0]])]
        logits = heads.predict_mask_logits(features, boxes, images_t.image_sizes)
        assert logits.shape[:2] == (2, NUM_CLASSES + 1)
        # a B class (3) has its own mask logits, computed from its box weights: change them, they change
        before = logits.clone()
        heads.box_predictor.cls_score.weight[3] += 1.0
        after = heads.predict_mask_logits(features, boxes, images_t.image_sizes)
    assert not torch.allclose(before[:, 3], after[:, 3])
    assert torch.allclose(before[:, 1], after[:, 1])
    # end to end: a detection labelled with a B class carries a pasted mask
    with torch.no_grad():
        heads.score_thresh = 0.0
        heads.box_predictor.cls_score.bias.fill_(0.0)
        heads.box_predictor.cls_score.bias[3] = 20.0  # force class 3 (set B) detections
        out = model(images)[0]
    assert len(out["labels"]) > 0 and (out["labels"] == 3).all()
    assert out["masks"].shape[1:] == (1, 64, 64)
    assert out["masks"].std() > 0


@pytest.mark.parametrize("kind,layers", [("cls", 1), ("box", 3), ("cls+box", 2)])
def test_transfer_inputs_and_depths(kind, layers):
    predictor = transfer_model(kind=kind, layers=layers).roi_heads.mask_predictor
    assert isinstance(predictor, TransferMaskPredictor)
    linears = [m for m in predictor.weight_transfer if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    # T is an MLP with activations between its layers only: its last layer, which outputs the mask
    # weights (of either sign), is linear
    assert isinstance(predictor.weight_transfer[-1], torch.nn.Linear)
    assert len(predictor.weight_transfer) == 2 * layers - 1
    box_predictor = transfer_model(kind=kind, layers=layers).roi_heads.box_predictor
    emb = class_embeddings(box_predictor, kind)
    rep = box_predictor.cls_score.weight.shape[1]
    assert emb.shape == (NUM_CLASSES + 1, {"cls": 1, "box": 4, "cls+box": 5}[kind] * rep)
    # rows 4c..4c+3 of bbox_pred belong to class c
    if kind != "cls":
        assert torch.equal(emb[2, -4 * rep:].view(4, rep), box_predictor.bbox_pred.weight[8:12])


def test_transfer_logits_weigh_the_features_by_the_first_outputs_of_t_and_add_the_last_as_bias():
    """T's output per class is the 1x1 mask weights (dim_reduced values) then the bias: with the features made
    (1, 0, 0) everywhere, each class's logit is its first weight plus its bias."""
    vectors = random_class_vectors(3, 6, seed=1)
    predictor = TransferMaskPredictor(4, 3, 5, 2, transfer_input="randn", fused_mlp=False, class_vectors=vectors)
    with torch.no_grad():
        predictor.conv5_mask.weight.zero_()
        predictor.conv5_mask.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        logits = predictor(torch.randn(2, 4, 2, 2), None)
        w_seg = predictor.class_mask_weights(None)
    assert logits.shape == (2, 3, 4, 4)
    expected = (w_seg[:, 0] + w_seg[:, -1])[None, :, None, None].expand(2, 3, 4, 4)
    assert torch.allclose(logits, expected)


def test_baseline_heads_share_the_code_path():
    cfg = load_config(TINY, [], DEFAULTS)
    for head, channels in (("agnostic", 1), ("standard", NUM_CLASSES + 1)):
        cfg2 = copy.deepcopy(cfg)
        cfg2["model"]["mask_head"] = head
        model = build_model(cfg2, NUM_CLASSES)
        model.train()
        images, targets = images_and_targets(2)
        losses = model(images, targets)
        assert losses["loss_mask"] > 0
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == channels
        model.eval()
        with torch.no_grad():
            out = model(images[:1])[0]
        assert out["masks"].shape[1:] == (1, 64, 64)


COCO_NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
              "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
              "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
              "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
              "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
              "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
              "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
              "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
              "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
              "hair drier", "toothbrush"]


def test_voc_split_and_random_split(tmp_path):
    cats = [{"id": i + 1 + (i // 10), "name": n} for i, n in enumerate(COCO_NAMES)]
    a, b = voc_split(cats)
    assert len(a) == 20 and len(b) == 60 and not set(a) & set(b)
    assert {c["name"] for c in cats if c["id"] in a} == set(VOC_CLASSES_IN_COCO)
    a2, b2 = voc_split(cats, "nonvoc_to_voc")
    assert (a2, b2) == (b, a)
    r1, r2, r3 = random_split(cats, 40, seed=1), random_split(cats, 40, seed=1), random_split(cats, 40, seed=2)
    assert r1 == r2 and r1 != r3 and len(r1[0]) == 40 and sorted(r1[0] + r1[1]) == sorted(c["id"] for c in cats)
    path = tmp_path / "A.txt"
    path.write_text("# set A\nperson\n3\n\n")
    assert read_class_list(path, cats) == [1, 3]
    path.write_text("unicorn\n")
    with pytest.raises(UserError, match="unicorn"):
        read_class_list(path, cats)


def test_randn_input_is_a_fixed_seeded_gaussian_per_class():
    vectors = random_class_vectors(4, 6, seed=5)
    expected = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    expected[0] = 0.0  # background
    assert torch.equal(vectors, expected)
    assert not torch.equal(random_class_vectors(4, 6, seed=6), vectors)
    cfg = load_config(TINY, ["model.mask_head=transfer", "model.transfer.input=randn", "model.transfer.randn_dim=7",
                             "model.transfer.randn_seed=5"], DEFAULTS)
    model = build_model(cfg, NUM_CLASSES, [1])
    predictor = model.roi_heads.mask_predictor
    assert torch.equal(predictor.class_vectors, random_class_vectors(NUM_CLASSES + 1, 7, seed=5))
    assert predictor.weight_transfer[0].in_features == 7
    assert "roi_heads.mask_predictor.class_vectors" in model.state_dict()  # saved with the checkpoint
    # the vectors are fixed: the mask loss trains T, never them, and does not reach the box head
    model.train()
    images, targets = images_and_targets(1)
    loss = model(images, targets)["loss_mask"]
    assert not predictor.class_vectors.requires_grad
    box_w = model.roi_heads.box_predictor.cls_score.weight
    grads = torch.autograd.grad(loss, [box_w, predictor.weight_transfer[0].weight], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0


def _embedding_file(tmp_path, lines, name="vectors.txt"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_embedding_input_reads_class_vectors_from_a_file(tmp_path):
    path = _embedding_file(tmp_path, ["the 9 9 9", "Cat 1 2 3", "dog 4 5 6", "dining 1 0 1", "table 3 2 -1",
                                      "dining_room 7 7 7"])
    vectors = read_class_embeddings(path, ["dog", "cat", "dining table"])
    # row 0 background, then the classes in label order; "dining table" is the mean of its words
    assert vectors.tolist() == [[0, 0, 0], [4, 5, 6], [1, 2, 3], [2, 1, 0]]
    # a line of its own beats the mean of the words
    path2 = _embedding_file(tmp_path, ["dining 1 0 1", "table 3 2 -1", "dining_table 0.5 0.5 0.5"], "own.txt")
    assert read_class_embeddings(path2, ["dining table"])[1].tolist() == [0.5, 0.5, 0.5]

    cfg = load_config(TINY, ["model.mask_head=transfer", "model.transfer.input=embedding",
                             f"model.transfer.embedding_file={path}"], DEFAULTS)
    model = build_model(cfg, 3, [1], class_names=["cat", "dog", "dining table"])
    assert model.roi_heads.mask_predictor.class_vectors.tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6], [2, 1, 0]]
    with pytest.raises(UserError, match="embedding_file"):
        build_model(load_config(TINY, ["model.mask_head=transfer", "model.transfer.input=embedding"], DEFAULTS),
                    3, [1], class_names=["cat", "dog", "dining table"])


@pytest.mark.parametrize("lines,names,message", [
    (["cat 1 2 3"], ["cat", "zebra"], r"no vector for class 'zebra'$"),
    (["cat 1 2 3", "hot 1 1 1"], ["cat", "hot dog"], r"no vector for class 'hot dog' \(nor for its word 'dog'\)"),
    (["cat 1 2 3", "dog 4 5"], ["cat", "dog"], r"vectors.txt:2: 'dog' has 2 values, but earlier lines have 3"),
    (["cat 1 nan 3", "dog 4 5 6"], ["cat", "dog"], r"vectors.txt:1: the vector of 'cat' holds NaN"),
    (["cat 1 2 3", "cat 1 2 3"], ["cat"], r"vectors.txt:2: 'cat' appears twice \(first on line 1\)"),
    (["cat"], ["cat"], r"vectors.txt:1: 'cat' has no vector values"),
])
def test_embedding_file_errors_name_the_culprit(tmp_path, lines, names, message):
    path = _embedding_file(tmp_path, lines)
    with pytest.raises(UserError, match=message):
        read_class_embeddings(path, names)


def test_embedding_error_from_the_command_line_names_the_missing_class(tmp_path):
    from detectron2_train.engine import run
    from tests.helpers.synthetic_shapes import make_dataset
    from detectron2_train.train_net import config_from_args, parse_args
    from utils.distributed import DistInfo

    data = make_dataset(tmp_path / "syn", num_images=2, seed=4)  # classes: rectangle, ellipse
    path = _embedding_file(tmp_path, ["rectangle 1 2"])
    args = parse_args(["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--train_json", str(data),
                       "--train_root", str(data.parent / "images"), "--mask_head", "transfer",
                       "--set", "model.transfer.input=embedding", f"model.transfer.embedding_file={path}"])
    with pytest.raises(UserError) as error:
        run(config_from_args(args), DistInfo())
    assert str(error.value) == f"class embedding file {path} has no vector for class 'ellipse'"
    assert not (tmp_path / "out").exists()


def test_agnostic_mlp_head_adds_the_mlp_logits_to_one_mask_channel():
    cfg = load_config(TINY, ["model.mask_head=agnostic_mlp"], DEFAULTS)
    predictor = build_model(cfg, NUM_CLASSES).roi_heads.mask_predictor
    assert isinstance(predictor, AgnosticMLPMaskPredictor)
    torch.manual_seed(0)
    x = torch.randn(2, cfg["model"]["mask_head_channels"], 14, 14)
    with torch.no_grad():
        fcn = predictor.mask_fcn_logits(torch.relu(predictor.conv5_mask(x)))
        out = predictor(x)
        assert out.shape == (2, 1, 28, 28)
        assert torch.allclose(out, fcn + predictor.mlp_branch(x)[:, None])
