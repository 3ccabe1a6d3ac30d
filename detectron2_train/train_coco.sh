#!/usr/bin/env bash
# MaskDistill COCO20k recipe: class-agnostic Mask R-CNN on the pseudo-masks of COCO20k (the LOST
# subset of COCO train2014), evaluated class-agnostically on COCO20k's own ground truth, then
# optional self-training rounds.
#
#   sh detectron2_train/train_coco.sh IMAGE_DIR COCO_JSON FILE_LIST [OUTPUT]     (from the repository root)
#   e.g. sh detectron2_train/train_coco.sh datasets/coco/train2014 \
#          datasets/coco/annotations/instances_train2014.json datasets/coco_20k_filenames.txt output/coco20k
#   TINY=1 ... smoke test with a tiny model and a random ViT; NPROC=8 ... trains through torchrun.
#
# Every path and setting below and in _common.sh (TINY, NPROC, ROUNDS, SCORE_THRESH, VIT_WEIGHTS,
# BACKBONE_WEIGHTS, EXTRA, OVERWRITE, PYTHON) can be set from the environment (VAR=value sh train_coco.sh).
# The rounds run in Python: detectron2_train/train_net.py --rounds (see docs/mask_rcnn.md).
set -eu

IMAGE_DIR=${1:-${IMAGE_DIR:-datasets/coco/train2014}}
COCO_JSON=${2:-${COCO_JSON:-datasets/coco/annotations/instances_train2014.json}}
FILE_LIST=${3:-${FILE_LIST:-datasets/coco_20k_filenames.txt}}  # LOST's COCO20k file list
OUTPUT=${4:-${OUTPUT:-output/coco20k}}
CONFIG=${CONFIG:-configs/detectron2/coco20k.yaml}
IMAGES="$IMAGE_DIR"
TINY_EXTRA=""
. "$(dirname "$0")/_common.sh"
mkdir -p "$OUTPUT"

# 1. Pseudo-masks for COCO20k; gen_masks.py also writes coco20k_gt.json and coco20k_gt_class_agnostic.json.
if [ ! -f "$OUTPUT/pseudo_masks.json" ]; then
    $PYTHON gen_masks.py --dataset COCO20k --dataset_root "$IMAGE_DIR" --coco_json "$COCO_JSON" \
        --file_list "$FILE_LIST" --weights "$VIT_WEIGHTS" --pred_json_path "$OUTPUT/pseudo_masks.json" \
        --resume $GEN_EXTRA
fi
# 2. Train, predict COCO20k, evaluate; later rounds self-train on the previous predictions.
self_train "$OUTPUT/coco20k_gt_class_agnostic.json"
echo "done: models, predictions (train_results.json) and evaluation (eval.json) in $OUTPUT/round*/"
