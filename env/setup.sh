#!/usr/bin/env bash
# Create .venv at the repository root and install the pinned dependencies.
# Usage: bash env/setup.sh        (re-running is safe: an existing .venv is reused)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip setuptools wheel
# pydensecrf2 is an sdist that compiles against numpy with Cython; give it both at build time.
.venv/bin/python -m pip install --quiet "cython>=3" "numpy==2.4.6"
.venv/bin/python -m pip install --quiet -r env/requirements.txt
# This checkout itself, editable (pyproject.toml): the console scripts, and the packages importable from
# `python segmentation/train.py` and the benchmarks. Offline: it builds with the setuptools installed above.
.venv/bin/python -m pip install --quiet --no-index --no-build-isolation --no-deps -e .
.venv/bin/maskdistill-train-net --help > /dev/null  # a console script imports the checkout's packages
.venv/bin/python - <<'PY'
import torch, torchvision, timm, pydensecrf.densecrf, pycocotools.mask, cv2, sklearn, skimage
from torchvision.ops import nms
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # torchvision's compiled ops load
print(f"environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}")
PY
