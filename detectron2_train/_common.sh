# Shared by train_voc.sh, train_coco.sh and train_cutler.sh, which source it (POSIX sh) after setting
# OUTPUT, IMAGES (the image root of their JSONs), CONFIG (the full-size config), TINY_EXTRA (overrides
# only the TINY=1 smoke test adds) and optionally TINY_CONFIG (the config of the smoke test; default
# tiny_test.yaml). Gives the common settings and `self_train`.
#
# Every setting below and in _launch.sh can be set from the environment (VAR=value sh train_voc.sh).

. "$(dirname "$0")/_launch.sh"                    # PYTHON, TINY, NPROC, LAUNCH
ROUNDS=${ROUNDS:-1}                                # self-training rounds (1: train on the pseudo-masks only)
SCORE_THRESH=${SCORE_THRESH:-0.7}                  # self-training: keep predictions scoring at least this;
                                                   # several values ("0.7 0.8") set rounds 2, 3, ... one by one
VIT_WEIGHTS=${VIT_WEIGHTS:-dino}                   # gen_masks.py --weights: dino, PATH or random
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-none}         # Mask R-CNN backbone: none, imagenet or PATH (e.g. DINO R50)
EXTRA=${EXTRA:-}                                   # more --set overrides, e.g. "solver.max_iter=40000"
OVERWRITE=${OVERWRITE:-0}                          # 1: rerun rounds recorded with other settings (else refused)

if [ "$TINY" = 1 ]; then
    CONFIG=${TINY_CONFIG:-configs/detectron2/tiny_test.yaml}
    VIT_WEIGHTS=random
    GEN_EXTRA="--resize 224 --max_size 320 --batch_size 1 --num_workers 0"
    EXTRA="solver.max_iter=4 solver.checkpoint_period=1000 $TINY_EXTRA model.mask_head=agnostic model.box_score_thresh=0.0 $EXTRA"
else
    GEN_EXTRA=""
fi

# self_train TEST_JSON [FLAG ...]
#   The self-training rounds of detectron2_train/train_net.py --rounds, in $OUTPUT/round1 .. round$ROUNDS:
#   class-agnostic training on $OUTPUT/pseudo_masks.json (round 1) or on the previous round's
#   predictions scoring at least SCORE_THRESH on those images; each round predicts the training images
#   (train_results.json) and TEST_JSON (none when empty), and evaluates the latter (eval.json: masks and
#   boxes, IoU 0.5 and 0.7). More train_net.py flags follow TEST_JSON. A rerun skips finished rounds and
#   resumes an interrupted one.
self_train() {
    _test_json=$1
    shift
    if [ -n "$_test_json" ]; then
        set -- "$@" --test_json "$_test_json" --test_root "$IMAGES"
    fi
    if [ "$OVERWRITE" = 1 ]; then
        set -- "$@" --overwrite
    fi
    $LAUNCH detectron2_train/train_net.py --config "$CONFIG" --output_dir "$OUTPUT" --rounds "$ROUNDS" \
        --score_thresh $SCORE_THRESH --class_agnostic --train_json "$OUTPUT/pseudo_masks.json" \
        --train_root "$IMAGES" "$@" --set model.backbone_weights="$BACKBONE_WEIGHTS" $EXTRA
}
