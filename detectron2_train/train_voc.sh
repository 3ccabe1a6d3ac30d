#!/usr/bin/env bash
# MaskDistill VOC recipe: class-agnostic Mask R-CNN on the pseudo-masks of VOC12 trainval,
# evaluated on the VOC12 val instance ground truth, then optional self-training rounds.
#
#   sh detectron2_train/train_voc.sh [VOC_ROOT] [OUTPUT]     (from the repository root)
#   TINY=1 sh detectron2_train/train_voc.sh ../shared/data/voc_mini/VOCdevkit /tmp/voc_tiny   (smoke test)
#   NPROC=8 sh detectron2_train/train_voc.sh /data/VOCdevkit output/voc   (8 GPUs through torchrun)
#
# Every path and setting below and in _common.sh (TINY, NPROC, ROUNDS, SCORE_THRESH, VIT_WEIGHTS,
# BACKBONE_WEIGHTS, EXTRA, PYTHON) can be set from the environment (VAR=value sh train_voc.sh).
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

# 3. Train on the pseudo-masks, predict and evaluate val; later rounds train on the previous
#    round's confident predictions on trainval (self-training).
round=1
while [ "$round" -le "$ROUNDS" ]; do
    RUN="$OUTPUT/round$round"
    PSEUDO_FROM=""
    if [ "$round" -gt 1 ]; then
        PSEUDO_FROM="$OUTPUT/round$((round - 1))/trainval_results.json"
    fi
    train_round "$RUN" "$OUTPUT/voc12_val_instances.json" "$RUN/eval_val.json" "$PSEUDO_FROM"
    if [ "$round" -lt "$ROUNDS" ]; then
        # predictions on trainval seed the next round
        $TRAIN --config "$CONFIG" --output_dir "$RUN" --eval_only --weights "$RUN/model_final.pth" --class_agnostic \
            --test_json "$OUTPUT/pseudo_masks.json" --test_root "$IMAGES" --results "$RUN/trainval_results.json" \
            --no_eval ${EXTRA:+--set $EXTRA}
    fi
    round=$((round + 1))
done
echo "done: results and evaluation in $OUTPUT/round*/"
