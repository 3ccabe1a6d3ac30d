#!/usr/bin/env bash
# MaskX R-CNN recipe, stage-wise ("Learning to Segment Every Thing", Hu et al. 2018): split COCO's classes
# into set A (masks) and set B (boxes only), train Faster R-CNN on the boxes of A and B (stage box), then
# the mask branch and the transfer function on the masks of A on that frozen detector (stage mask),
# evaluate mask and box AP on set A and on set B of val, and print them as the paper's table.
#
#   sh detectron2_train/train_maskx.sh COCO_ROOT [OUTPUT]     (from the repository root)
#   e.g. NPROC=8 sh detectron2_train/train_maskx.sh datasets/coco output/maskx_sw
#   TINY=1 sh detectron2_train/train_maskx.sh ../shared/data/tiny_coco /tmp/maskx_tiny   (smoke test: tiny model)
#
# COCO_ROOT holds annotations/instances_{train,val}2017.json, train2017/ and val2017/. Every path and setting
# below and in _launch.sh (TINY, NPROC, PYTHON) can be set from the environment (VAR=value sh train_maskx.sh).
# A rerun resumes each training from its checkpoints (refused when made with other settings) and
# predicts and evaluates again.
set -eu

COCO_ROOT=${1:-${COCO_ROOT:-datasets/coco}}
OUTPUT=${2:-${OUTPUT:-output/maskx_sw}}            # everything this script writes
SPLIT=${SPLIT:-voc_to_nonvoc}                      # make_split.py --split: voc_to_nonvoc (A = the 20 VOC classes),
                                                   # nonvoc_to_voc, or random (with SPLIT_EXTRA="--num_a 40 --seed 3")
SPLIT_EXTRA=${SPLIT_EXTRA:-}
BOX_CONFIG=${BOX_CONFIG:-configs/detectron2/maskx/sw/box_stage.yaml}   # stage 1: boxes of A and B
MASK_CONFIG=${MASK_CONFIG:-configs/detectron2/maskx/sw/transfer.yaml}  # stage 2: any sw/ row (Table 1)
EXTRA=${EXTRA:-}                                   # more --set overrides of both stages, e.g. "solver.max_iter=1000"
. "$(dirname "$0")/_launch.sh"
if [ "$TINY" = 1 ]; then
    BOX_CONFIG=configs/detectron2/tiny_maskx_box_stage.yaml
    MASK_CONFIG=configs/detectron2/tiny_maskx_transfer.yaml
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 solver.ims_per_batch=2 model.box_score_thresh=0.0 \
model.detections_per_img=5 $EXTRA"
fi
TRAIN_JSON="$COCO_ROOT/annotations/instances_train2017.json"
VAL_JSON="$COCO_ROOT/annotations/instances_val2017.json"
ROW=$(basename "$MASK_CONFIG" .yaml)
mkdir -p "$OUTPUT"

# 1. Set A and set B (A.txt, B.txt: one "id  # name" line per class), written anew: a changed split makes
#    the resumed mask stage refuse its checkpoint (its --mask_classes content differs).
$PYTHON detectron2_train/make_split.py --gt_file "$TRAIN_JSON" --split "$SPLIT" $SPLIT_EXTRA --out_dir "$OUTPUT/splits" \
    --overwrite
# 2. Stage box: Faster R-CNN on the boxes of every class (the mask branch is frozen and gets no loss).
$LAUNCH detectron2_train/train_net.py --config "$BOX_CONFIG" --output_dir "$OUTPUT/box_stage" --resume \
    --train_json "$TRAIN_JSON" --train_root "$COCO_ROOT/train2017" --set $EXTRA
# 3. Stage mask: the box stage frozen, the mask branch trained on the masks of set A; predicts val.
$LAUNCH detectron2_train/train_net.py --config "$MASK_CONFIG" --output_dir "$OUTPUT/$ROW" --resume \
    --weights "$OUTPUT/box_stage/model_final.pth" --mask_classes "$OUTPUT/splits/A.txt" \
    --train_json "$TRAIN_JSON" --train_root "$COCO_ROOT/train2017" \
    --test_json "$VAL_JSON" --test_root "$COCO_ROOT/val2017" --set $EXTRA
# 4. Mask and box AP on each set (eval_A.json, eval_B.json), then the table.
for set in A B; do
    $PYTHON eval_instances.py --input_file "$OUTPUT/$ROW/inference/results.json" --gt_file "$VAL_JSON" \
        --iou_type both --eval_classes $(cut -d' ' -f1 "$OUTPUT/splits/$set.txt") \
        --out_json "$OUTPUT/$ROW/inference/eval_$set.json" --overwrite > "$OUTPUT/$ROW/inference/eval_$set.txt"
done
$PYTHON detectron2_train/summarize.py "$OUTPUT/$ROW"
