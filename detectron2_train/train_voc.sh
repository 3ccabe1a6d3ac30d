#!/usr/bin/env bash
# MaskDistill VOC recipe: class-agnostic Mask R-CNN on the pseudo-masks of VOC12 trainval,
# evaluated on the VOC12 val instance ground truth, then optional self-training rounds.
#
#   sh detectron2_train/train_voc.sh [VOC_ROOT] [OUTPUT]     (from the repository root)
#   TINY=1 sh detectron2_train/train_voc.sh ../shared/data/voc_mini/VOCdevkit /tmp/voc_tiny   (smoke test)
#   NPROC=8 sh detectron2_train/train_voc.sh /data/VOCdevkit output/voc   (8 GPUs through torchrun)
#
# Every path and setting below and in _common.sh (TINY, NPROC, ROUNDS, SCORE_THRESH, VIT_WEIGHTS,
# BACKBONE_WEIGHTS, EXTRA, OVERWRITE, PYTHON) can be set from the environment (VAR=value sh train_voc.sh).
# The rounds run in Python: detectron2_train/train_net.py --rounds (see docs/mask_rcnn.md).
set -eu

VOC_ROOT=${1:-${VOC_ROOT:-datasets/VOCdevkit}}     # folder holding VOC2012/
OUTPUT=${2:-${OUTPUT:-output/voc}}                 # everything this script writes
CONFIG=${CONFIG:-configs/detectron2/voc_class_agnostic.yaml}
IMAGES="$VOC_ROOT"   # file_name in both JSONs is VOC2012/JPEGImages/<id>.jpg
TINY_EXTRA="data.class_agnostic=true"
. "$(dirname "$0")/_common.sh"
mkdir -p "$OUTPUT"

# 1. Pseudo-masks for VOC12 trainval (one object per image, COCO JSON); resumable.
if [ ! -f "$OUTPUT/pseudo_masks.json" ]; then
    $PYTHON gen_masks.py --dataset VOCClass --dataset_root "$VOC_ROOT" --year 2012 --set trainval \
        --weights "$VIT_WEIGHTS" --pred_json_path "$OUTPUT/pseudo_masks.json" --resume $GEN_EXTRA
fi
# 2. Class-agnostic instance ground truth of VOC12 val.
if [ ! -f "$OUTPUT/voc12_val_instances.json" ]; then
    $PYTHON convert_voc.py --voc_root "$VOC_ROOT/VOC2012" --image_set val --class_agnostic \
        --out_file "$OUTPUT/voc12_val_instances.json"
fi

# 3. Train on the pseudo-masks, predict trainval and val, evaluate val; later rounds train on the
#    previous round's confident predictions on trainval (self-training).
self_train "$OUTPUT/voc12_val_instances.json"
echo "done: models, predictions (train_results.json: trainval) and evaluation (eval.json: val) in $OUTPUT/round*/"
