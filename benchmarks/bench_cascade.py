"""Cascade vs standard RoI heads on the synthetic shapes: box / mask AP and AP75 after the same training.

  python benchmarks/bench_cascade.py                      # tiny model, 300 iterations, seeds 0 1 2 (CPU, ~20 min)
  python benchmarks/bench_cascade.py --iters 100 --seeds 0 # a quick look

Both models train through engine.train with the same config, data, seed and iterations
(model.roi_heads standard vs cascade), predict held-out synthetic images through
engine.run_inference and are scored with pycocotools. Prints one line per run, the medians per
head, the training time and the peak RSS.
"""
import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detectron2_train.engine import DEFAULTS, coco_evaluate, run_inference, train
from tests.helpers.synthetic_shapes import make_dataset
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import run_cli

HEADS = ("standard", "cascade")
METRICS = (("bbox", "AP"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP75"))


def run_once(tmp: Path, roi_heads: str, seed: int, iters: int, train_json: Path, val_json: Path) -> dict:
    cfg = load_config("configs/detectron2/tiny_test.yaml", [f"model.roi_heads={roi_heads}"], DEFAULTS)
    out = tmp / f"{roi_heads}_{seed}"
    cfg["output_dir"] = str(out)
    cfg["data"].update(train_json=str(train_json), train_root=str(train_json.parent / "images"), num_workers=0)
    cfg["solver"].update(max_iter=iters, steps=[int(iters * 0.8)], seed=seed, checkpoint_period=10 * iters,
                         log_period=iters)
    start = time.perf_counter()
    final = train(cfg, DistInfo())
    seconds = time.perf_counter() - start
    results = run_inference(cfg, DistInfo(), str(final), str(val_json), str(val_json.parent / "images"),
                            out / "inference" / "results.json")
    summary = coco_evaluate(str(val_json), results)
    return {"seconds": seconds, **{f"{t} {k}": summary[t][k] for t, k in METRICS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300, help="training iterations per run (default 300)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--train_images", type=int, default=8, help="synthetic training images (default 8)")
    p.add_argument("--val_images", type=int, default=24, help="held-out synthetic images (default 24)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, list[dict]] = {h: [] for h in HEADS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_json = make_dataset(tmp / "train", args.train_images, seed=1, max_objects=3)
        val_json = make_dataset(tmp / "val", args.val_images, seed=1000, max_objects=3)
        for seed in args.seeds:
            for head in HEADS:  # alternate, so that load from other jobs hits both alike
                row = run_once(tmp, head, seed, args.iters, train_json, val_json)
                rows[head].append(row)
                print(f"{head:8s} seed {seed}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    print(f"\nmedians over seeds {args.seeds}, {args.iters} iterations, {args.train_images} training / "
          f"{args.val_images} held-out images:")
    print("| heads | " + " | ".join(f"{t} {k}" for t, k in METRICS) + " | train s |")
    print("|---" * (len(METRICS) + 2) + "|")
    for head in HEADS:
        med = {k: statistics.median(r[k] for r in rows[head]) for k in rows[head][0]}
        print(f"| {head} | " + " | ".join(f"{med[f'{t} {k}']:.1f}" for t, k in METRICS) + f" | {med['seconds']:.0f} |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    run_cli(main)
