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
# Every path and setting below can be set from the environment (VAR=value sh train_coco.sh).
set -eu

IMAGE_DIR=${1:-${IMAGE_DIR:-datasets/coco/train2014}}
COCO_JSON=${2:-${COCO_JSON:-datasets/coco/annotations/instances_train2014.json}}
FILE_LIST=${3:-${FILE_LIST:-datasets/coco_20k_filenames.txt}}  # LOST's COCO20k file list
OUTPUT=${4:-${OUTPUT:-output/coco20k}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
TINY=${TINY:-0}
NPROC=${NPROC:-1}
ROUNDS=${ROUNDS:-1}
SCORE_THRESH=${SCORE_THRESH:-0.7}
VIT_WEIGHTS=${VIT_WEIGHTS:-dino}
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}
CONFIG=${CONFIG:-configs/detectron2/coco20k.yaml}
EXTRA=${EXTRA:-}

if [ "$TINY" = 1 ]; then
    CONFIG=configs/detectron2/tiny_test.yaml
    VIT_WEIGHTS=random
    GEN_EXTRA="--resize 224 --max_size 320 --batch_size 1 --num_workers 0"
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 model.mask_head=agnostic model.box_score_thresh=0.0 $EXTRA"
else
    GEN_EXTRA=""
fi
if [ "$NPROC" -gt 1 ]; then
    TRAIN="$PYTHON -m torch.distributed.run --nproc_per_node $NPROC detectron2_train/train_net.py"
else
    TRAIN="$PYTHON detectron2_train/train_net.py"
fi
mkdir -p "$OUTPUT"

# 1. Pseudo-masks for COCO20k; gen_masks.py also writes coco20k_gt.json and coco20k_gt_class_agnostic.json.
if [ ! -f "$OUTPUT/pseudo_masks.json" ]; then
    $PYTHON gen_masks.py --dataset COCO20k --dataset_root "$IMAGE_DIR" --coco_json "$COCO_JSON" \
        --file_list "$FILE_LIST" --weights "$VIT_WEIGHTS" --pred_json_path "$OUTPUT/pseudo_masks.json" \
        --resume $GEN_EXTRA
fi
GT="$OUTPUT/coco20k_gt_class_agnostic.json"

# 2. Train, predict COCO20k, evaluate; later rounds self-train on the previous predictions.
round=1
while [ "$round" -le "$ROUNDS" ]; do
    RUN="$OUTPUT/round$round"
    PSEUDO=""
    if [ "$round" -gt 1 ]; then
        PSEUDO="--pseudo_from $OUTPUT/round$((round - 1))/inference/results.json --score_thresh $SCORE_THRESH"
    fi
    $TRAIN --config "$CONFIG" --output_dir "$RUN" --resume --class_agnostic \
        --train_json "$OUTPUT/pseudo_masks.json" --train_root "$IMAGE_DIR" $PSEUDO \
        --test_json "$GT" --test_root "$IMAGE_DIR" --no_eval \
        --set model.backbone_weights="$BACKBONE_WEIGHTS" $EXTRA
    $PYTHON eval_instances.py --input_file "$RUN/inference/results.json" --gt_file "$GT" \
        --class_agnostic --iou_type both --iou_thresholds 0.5 0.7 --out_json "$RUN/eval_coco20k.json"
    round=$((round + 1))
done
echo "done: results and evaluation in $OUTPUT/round*/"
