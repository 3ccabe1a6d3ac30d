#!/usr/bin/env bash
# GGN recipe, VOC -> non-VOC on COCO (Wang et al., CVPR 2022): learn pairwise affinity from the masks of
# the 20 VOC classes, group it into pseudo-masks on the training images, train a class-agnostic Mask R-CNN
# on the VOC-class annotations plus the best pseudo-masks, and report the open-world AR@10/20/50/100 on
# the 60 non-VOC classes of val2017 (see docs/ggn.md).
#
#   sh detectron2_train/train_ggn.sh [COCO_ROOT] [OUTPUT]     (from the repository root)
#   TINY=1 sh detectron2_train/train_ggn.sh ../shared/data/tiny_coco /tmp/ggn_tiny   (smoke test on the CPU)
#   NPROC=8 sh detectron2_train/train_ggn.sh datasets/coco output/ggn   (8 GPUs through torchrun)
#
# COCO_ROOT holds annotations/instances_{train,val}2017.json, train2017/ and val2017/. Every path and
# setting below and in _launch.sh (TINY, NPROC, PYTHON) can be set from the environment
# (VAR=value sh train_ggn.sh). A rerun skips finished steps and resumes the trainings and the pseudo-masks.
set -eu

COCO_ROOT=${1:-${COCO_ROOT:-datasets/coco}}
OUTPUT=${2:-${OUTPUT:-output/ggn}}
CONFIG=${CONFIG:-configs/detectron2/ggn_coco.yaml}        # class-agnostic Mask R-CNN
PA_CONFIG=${PA_CONFIG:-configs/affinity/ggn_voc.yaml}     # PA predictor
SPLIT=${SPLIT:-voc_to_nonvoc}                             # make_split.py: seen classes A, unseen B
PA_MASKS=${PA_MASKS:-20}                                  # pseudo-masks written per image (gen_pa_masks.py --topk)
PSEUDO_TOPK=${PSEUDO_TOPK:-3}                             # ... of which the best K with IoU < 0.5 train
MAX_DETS=${MAX_DETS:-10 20 50 100}                        # the k of the open-world AR@k
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-imagenet}            # both ResNet-50s: imagenet, none or PATH
PA_EXTRA=${PA_EXTRA:-}                                    # more --set overrides of the PA predictor
GROUP_EXTRA=${GROUP_EXTRA:-}                              # more gen_pa_masks.py flags
EXTRA=${EXTRA:-}                                          # more --set overrides of the Mask R-CNN
TRAIN_JSON="$COCO_ROOT/annotations/instances_train2017.json"
VAL_JSON="$COCO_ROOT/annotations/instances_val2017.json"
. "$(dirname "$0")/_launch.sh"                           # PYTHON, TINY, NPROC, LAUNCH
if [ "$TINY" = 1 ]; then  # tiny models from scratch, a few iterations, pseudo-masks for 8 images
    CONFIG=configs/detectron2/tiny_ggn_coco.yaml
    PA_CONFIG=configs/affinity/tiny_ggn_voc.yaml
    BACKBONE_WEIGHTS=none
    PA_EXTRA="solver.max_iter=10 $PA_EXTRA"
    GROUP_EXTRA="--max_images 8 --num_workers 0 $GROUP_EXTRA"
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 $EXTRA"
fi
mkdir -p "$OUTPUT"

# 1. The class split: splits/A.txt (VOC classes, seen) and splits/B.txt (non-VOC, unseen).
if [ ! -f "$OUTPUT/splits/B.txt" ]; then
    $PYTHON detectron2_train/make_split.py --gt_file "$TRAIN_JSON" --split "$SPLIT" --out_dir "$OUTPUT/splits"
fi
# 2. The PA predictor, on the masks of the seen classes.
$LAUNCH detectron2_train/train_affinity.py --config "$PA_CONFIG" --output_dir "$OUTPUT/pa" --resume \
    --train_json "$TRAIN_JSON" --train_root "$COCO_ROOT/train2017" --seen_classes "$OUTPUT/splits/A.txt" \
    --set model.backbone_weights="$BACKBONE_WEIGHTS" $PA_EXTRA
# 3. Pseudo-masks on the training images: the top PA_MASKS of each, grouped from its PA map (one shard
#    per process with NPROC > 1; an interrupted run resumes).
if [ ! -f "$OUTPUT/pa_masks.json" ]; then
    $LAUNCH gen_pa_masks.py --dataset folder --dataset_root "$COCO_ROOT/train2017" --resume \
        --affinity "$OUTPUT/pa/model_final.pth" --topk "$PA_MASKS" --pred_json_path "$OUTPUT/pa_masks.json" $GROUP_EXTRA
fi
# 4. Class-agnostic Mask R-CNN on the seen classes' annotations + PSEUDO_TOPK pseudo-masks per image;
#    predictions on val2017.
$LAUNCH detectron2_train/train_net.py --config "$CONFIG" --output_dir "$OUTPUT/mask_rcnn" --resume --class_agnostic \
    --train_json "$TRAIN_JSON" --train_root "$COCO_ROOT/train2017" --seen_classes "$OUTPUT/splits/A.txt" \
    --pseudo_json "$OUTPUT/pa_masks.json" --pseudo_topk "$PSEUDO_TOPK" \
    --test_json "$VAL_JSON" --test_root "$COCO_ROOT/val2017" --no_eval \
    --set model.backbone_weights="$BACKBONE_WEIGHTS" $EXTRA
# 5. Open-world AR@k on the unseen classes (GT of the seen classes ignored).
$PYTHON eval_instances.py --input_file "$OUTPUT/mask_rcnn/inference/results.json" --gt_file "$VAL_JSON" \
    --class_agnostic --eval_classes $(cut -d' ' -f1 "$OUTPUT/splits/B.txt") --max_dets $MAX_DETS \
    --out_json "$OUTPUT/eval_unseen.json" --overwrite
echo "done: PA predictor in $OUTPUT/pa, pseudo-masks $OUTPUT/pa_masks.json, Mask R-CNN in $OUTPUT/mask_rcnn, AR $OUTPUT/eval_unseen.json"
