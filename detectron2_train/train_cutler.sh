#!/usr/bin/env bash
# CutLER recipe (Wang et al. 2023, "Cut and Learn"): MaskCut pseudo-masks on a folder of images, a
# class-agnostic Cascade Mask R-CNN trained on them (DropLoss, copy-paste), then self-training rounds
# (predictions scoring >= 0.7, then >= 0.65, plus the earlier pseudo-masks they do not cover; DropLoss off;
# each round starts from the previous one's weights). Optionally evaluated, class-agnostically, on the
# COCO ground truth of the same images.
#
#   sh detectron2_train/train_cutler.sh IMAGES OUTPUT [GT_JSON]     (from the repository root)
#   e.g. NPROC=8 BACKBONE_WEIGHTS=/path/dino_resnet50_pretrain.pth sh detectron2_train/train_cutler.sh \
#          datasets/imagenet/train output/cutler
#   TINY=1 sh detectron2_train/train_cutler.sh ../shared/data/tiny_coco/val2017 /tmp/cutler_tiny \
#          ../shared/data/tiny_coco/annotations/instances_val2017.json     (smoke test: tiny model, random ViT)
#
# Every path and setting below and in _common.sh (TINY, NPROC, ROUNDS, SCORE_THRESH, VIT_WEIGHTS,
# BACKBONE_WEIGHTS, EXTRA, OVERWRITE, PYTHON) can be set from the environment (VAR=value sh train_cutler.sh).
# The rounds run in Python: detectron2_train/train_net.py --rounds (see docs/mask_rcnn.md).
set -eu

IMAGES=${1:-${IMAGES:-datasets/imagenet/train}}   # a folder of images, searched recursively
OUTPUT=${2:-${OUTPUT:-output/cutler}}             # everything this script writes
GT_JSON=${3:-${GT_JSON:-}}                        # optional COCO ground truth of IMAGES (file names relative to it)
METHOD=${METHOD:-maskcut}                         # gen_masks.py --method that makes the pseudo-masks
CONFIG=${CONFIG:-configs/detectron2/cutler/cascade_mask_rcnn_r50.yaml}              # round 1 (DropLoss on)
ROUND_CONFIG=${ROUND_CONFIG:-configs/detectron2/cutler/cascade_mask_rcnn_r50_self_train.yaml}  # rounds 2, 3, ...
ROUNDS=${ROUNDS:-3}                               # round 1 + CutLER's two self-training rounds
SCORE_THRESH=${SCORE_THRESH:-0.7 0.65}            # rounds 2 and 3 keep predictions scoring at least these
ADD_BACK_IOU=${ADD_BACK_IOU:-0.5}                 # earlier pseudo-masks with IoU below this with every kept one stay
GEN_MODEL=${GEN_MODEL:---arch vit_base --patch_size 8}  # CutLER's MaskCut runs DINO ViT-B/8
TINY_IMAGES=${TINY_IMAGES:-4}                     # TINY=1: pseudo-masks (and training) on the first N images only
TINY_CONFIG=configs/detectron2/cutler/tiny_cascade_mask_rcnn_r50.yaml
TINY_EXTRA=""
. "$(dirname "$0")/_common.sh"
if [ "$TINY" = 1 ]; then
    ROUND_CONFIG=configs/detectron2/cutler/tiny_cascade_mask_rcnn_r50_self_train.yaml
    GEN_MODEL=""
    GEN_EXTRA="--max_images $TINY_IMAGES --batch_size 1 --num_workers 0 --post_workers 0"
    if [ "$METHOD" = maskcut ]; then
        GEN_EXTRA="$GEN_EXTRA --fixed_size 224"
    else
        GEN_EXTRA="$GEN_EXTRA --resize 224 --max_size 320"
    fi
fi
mkdir -p "$OUTPUT"

# 1. Pseudo-masks (COCO JSON, several per image with MaskCut); resumable, skipped when done.
if [ ! -f "$OUTPUT/pseudo_masks.json" ]; then
    $PYTHON gen_masks.py --method "$METHOD" --dataset folder --dataset_root "$IMAGES" $GEN_MODEL \
        --weights "$VIT_WEIGHTS" --pred_json_path "$OUTPUT/pseudo_masks.json" --resume $GEN_EXTRA
fi
# 2. Round 1 trains on the pseudo-masks with CONFIG; rounds 2.. on the previous round's confident predictions
#    plus the earlier pseudo-masks they leave uncovered, with ROUND_CONFIG, from the previous round's weights.
self_train "$GT_JSON" --round_config "$ROUND_CONFIG" --add_back_iou "$ADD_BACK_IOU" --init_from_previous
echo "done: models, predictions (train_results.json) and pseudo-labels (pseudo_labels.json) in $OUTPUT/round*/"
