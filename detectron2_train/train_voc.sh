#!/usr/bin/env bash
# MaskDistill VOC recipe: class-agnostic Mask R-CNN on the pseudo-masks of VOC12 trainval,
# evaluated on the VOC12 val instance ground truth, then optional self-training rounds.
#
#   sh detectron2_train/train_voc.sh [VOC_ROOT] [OUTPUT]     (from the repository root)
#   TINY=1 sh detectron2_train/train_voc.sh ../shared/data/voc_mini/VOCdevkit /tmp/voc_tiny   (smoke test)
#   NPROC=8 sh detectron2_train/train_voc.sh /data/VOCdevkit output/voc   (8 GPUs through torchrun)
#
# Every path and setting below can be set from the environment (VAR=value sh train_voc.sh).
set -eu

VOC_ROOT=${1:-${VOC_ROOT:-datasets/VOCdevkit}}     # folder holding VOC2012/
OUTPUT=${2:-${OUTPUT:-output/voc}}                 # everything this script writes
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
TINY=${TINY:-0}                                    # 1: tiny model, random ViT, a few iterations
NPROC=${NPROC:-1}                                  # processes (GPUs) for training
ROUNDS=${ROUNDS:-1}                                # 1 + number of self-training rounds
SCORE_THRESH=${SCORE_THRESH:-0.7}                  # self-training: keep predictions above this
VIT_WEIGHTS=${VIT_WEIGHTS:-dino}                   # gen_masks.py --weights: dino, PATH or random
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}         # Mask R-CNN backbone: none, imagenet or PATH (e.g. DINO R50)
CONFIG=${CONFIG:-configs/detectron2/voc_class_agnostic.yaml}
EXTRA=${EXTRA:-}                                   # more --set overrides, e.g. "solver.max_iter=40000"

if [ "$TINY" = 1 ]; then
    CONFIG=configs/detectron2/tiny_test.yaml
    VIT_WEIGHTS=random
    GEN_EXTRA="--resize 224 --max_size 320 --batch_size 1 --num_workers 0"
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 data.class_agnostic=true model.mask_head=agnostic model.box_score_thresh=0.0 $EXTRA"
else
    GEN_EXTRA=""
fi
if [ "$NPROC" -gt 1 ]; then
    TRAIN="$PYTHON -m torch.distributed.run --nproc_per_node $NPROC detectron2_train/train_net.py"
else
    TRAIN="$PYTHON detectron2_train/train_net.py"
fi
IMAGES="$VOC_ROOT"   # file_name in both JSONs is VOC2012/JPEGImages/<id>.jpg
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

# 3. Train on the pseudo-masks, predict val; later rounds train on the previous round's
#    confident predictions on trainval (self-training).
TRAIN_JSON="$OUTPUT/pseudo_masks.json"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    RUN="$OUTPUT/round$round"
    PSEUDO=""
    if [ "$round" -gt 1 ]; then
        PSEUDO="--pseudo_from $OUTPUT/round$((round - 1))/trainval_results.json --score_thresh $SCORE_THRESH"
    fi
    # --resume makes a rerun continue where an interrupted one stopped.
    $TRAIN --config "$CONFIG" --output_dir "$RUN" --resume --class_agnostic \
        --train_json "$TRAIN_JSON" --train_root "$IMAGES" $PSEUDO \
        --test_json "$OUTPUT/voc12_val_instances.json" --test_root "$IMAGES" --no_eval \
        --set model.backbone_weights="$BACKBONE_WEIGHTS" $EXTRA
    # 4. Class-agnostic evaluation on the VOC12 val instance GT.
    $PYTHON eval_instances.py --input_file "$RUN/inference/results.json" --gt_file "$OUTPUT/voc12_val_instances.json" \
        --class_agnostic --iou_type both --iou_thresholds 0.5 0.7 --out_json "$RUN/eval_val.json"
    if [ "$round" -lt "$ROUNDS" ]; then
        # predictions on trainval seed the next round
        $TRAIN --config "$CONFIG" --output_dir "$RUN" --eval_only --weights "$RUN/model_final.pth" --class_agnostic \
            --test_json "$OUTPUT/pseudo_masks.json" --test_root "$IMAGES" --results "$RUN/trainval_results.json" \
            --no_eval ${EXTRA:+--set $EXTRA}
    fi
    round=$((round + 1))
done
echo "done: results and evaluation in $OUTPUT/round*/"
