# Sourced (POSIX sh) by every recipe in this folder: the Python that runs the steps (PYTHON), the smoke-test
# switch (TINY) and the launcher of training (LAUNCH: torchrun with NPROC processes when NPROC > 1).
# Each can be set from the environment (VAR=value sh train_voc.sh).

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
TINY=${TINY:-0}                                    # 1: tiny model, random ViT, a few iterations
NPROC=${NPROC:-1}                                  # processes (GPUs) for training
if [ "$NPROC" -gt 1 ]; then
    LAUNCH="$PYTHON -m torch.distributed.run --nproc_per_node $NPROC"
else
    LAUNCH="$PYTHON"
fi
