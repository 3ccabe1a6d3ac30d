"""Real images, real DINOv2 ViT-S/14: MaskCut's `--mask_score attention` (the DINOv2 default) puts the object
first where `official` (1 - Ncut/2) ranks a background cut above it, and scores the same elsewhere. Images
chosen from the measured sets of docs/dinov2.md where the two rankings differ. Skipped without the real data
or the checkpoint."""
import pytest

from distill.quality import GroundTruthSet, coco_ground_truth, discovery_runs, evaluate_discovery
from utils.vit import build_vit

# tiny_coco val2017 images on which the two scores rank MaskCut's masks differently (docs/dinov2.md)
DIFFERING = ["000000122745.jpg", "000000239274.jpg", "000000314294.jpg"]


@pytest.mark.slow
def test_attention_score_puts_the_object_first(tiny_coco, dinov2_vits14_checkpoint):
    gt = coco_ground_truth(tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json")
    chosen = GroundTruthSet(gt.name, [e for e in gt.entries if e.file_name in DIFFERING], gt.masks, gt.boxes)
    assert len(chosen.entries) == len(DIFFERING)
    runs = discovery_runs("dinov2_vits14", ["maskcut"], ["auto"], None, {"mask_score": ["official", "attention"]})
    official, attention = sorted(runs, key=lambda run: dict(run.params)["mask_score"] != "official")
    model = build_vit("dinov2_vits14", None, str(dinov2_vits14_checkpoint))
    scores = evaluate_discovery(model, [chosen], runs, progress=False)[gt.name]["scores"]
    assert scores[attention]["mask_iou"] > scores[official]["mask_iou"] + 0.1
    assert scores[attention]["hits"] >= scores[official]["hits"]
