# Shared by train_voc.sh and train_coco.sh, which source it (POSIX sh) after setting OUTPUT,
# IMAGES (the image root of their JSONs), CONFIG (the full-size config) and TINY_EXTRA (overrides
# only the TINY=1 smoke test adds). Gives the common settings, $TRAIN and `train_round`.
#
# Every setting below can be set from the environment (VAR=value sh train_voc.sh).

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
TINY=${TINY:-0}                                    # 1: tiny model, random ViT, a few iterations
NPROC=${NPROC:-1}                                  # processes (GPUs) for training
ROUNDS=${ROUNDS:-1}                                # 1 + number of self-training rounds
SCORE_THRESH=${SCORE_THRESH:-0.7}                  # self-training: keep predictions scoring at least this
VIT_WEIGHTS=${VIT_WEIGHTS:-dino}                   # gen_masks.py --weights: dino, PATH or random
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}         # Mask R-CNN backbone: none, imagenet or PATH (e.g. DINO R50)
EXTRA=${EXTRA:-}                                   # more --set overrides, e.g. "solver.max_iter=40000"

if [ "$TINY" = 1 ]; then
    CONFIG=configs/detectron2/tiny_test.yaml
    VIT_WEIGHTS=random
    GEN_EXTRA="--resize 224 --max_size 320 --batch_size 1 --num_workers 0"
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 $TINY_EXTRA model.mask_head=agnostic model.box_score_thresh=0.0 $EXTRA"
else
    GEN_EXTRA=""
fi
if [ "$NPROC" -gt 1 ]; then
    TRAIN="$PYTHON -m torch.distributed.run --nproc_per_node $NPROC detectron2_train/train_net.py"
else
    TRAIN="$PYTHON detectron2_train/train_net.py"
fi

# train_round RUN TEST_JSON EVAL_JSON [PSEUDO_FROM]
#   Trains class-agnostically in RUN on $OUTPUT/pseudo_masks.json, or, given PSEUDO_FROM (a
#   results JSON), on its predictions scoring at least SCORE_THRESH for those images (self-training); then
#   predicts TEST_JSON into RUN/inference/results.json and evaluates them class-agnostically
#   (IoU 0.5 and 0.7, masks and boxes) into EVAL_JSON.
train_round() {
    _pseudo=""
    if [ -n "${4:-}" ]; then
        _pseudo="--pseudo_from $4 --score_thresh $SCORE_THRESH"
    fi
    # --resume makes a rerun continue where an interrupted one stopped.
    $TRAIN --config "$CONFIG" --output_dir "$1" --resume --class_agnostic \
        --train_json "$OUTPUT/pseudo_masks.json" --train_root "$IMAGES" $_pseudo \
        --test_json "$2" --test_root "$IMAGES" --no_eval \
        --set model.backbone_weights="$BACKBONE_WEIGHTS" $EXTRA
    $PYTHON eval_instances.py --input_file "$1/inference/results.json" --gt_file "$2" \
        --class_agnostic --iou_type both --iou_thresholds 0.5 0.7 --out_json "$3"
}
