"""Mask R-CNN on the frozen DINOv2/DINO ViT: training iterations/s and peak memory with and without the token
cache (model.vit.cache_dir), on real photos with masks.

  python benchmarks/bench_vit_detector.py --weights CKPT --images ../shared/data/pets/images \
      --json ../shared/data/pets/annotations/instances.json            # 4 photos, 2 repeats (CPU, minutes)
  python benchmarks/bench_vit_detector.py --weights CKPT --images DIR --json GT.json --limit 8 --iters 8 --repeats 3

Each measurement runs in its own process (so each peak RSS is its own), the two settings alternating
(cache, plain, cache, plain, ...). A run first trains `--warmup` untimed iterations over the `--limit`
photos (no flips), which fills a fresh cache, then times `--iters` iterations over the same photos: with
the cache these read the ViT's tokens back memory-mapped and run only the pyramid and the heads. Prints
each run, the medians, and the ratios cache / plain, in wall-clock iterations/s and in CPU seconds per
iteration (the process's own CPU time: on a shared machine it moves much less with the load than the wall clock).
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import add_timing_args, timing_device
from utils.errors import run_cli

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="the ViT checkpoint (gen_masks.py --weights)")
    p.add_argument("--images", required=True, help="image folder of --json")
    p.add_argument("--json", required=True, help="COCO dataset with masks (trained class-agnostically)")
    p.add_argument("--config", default="configs/detectron2/vit_dinov2_s14_cpu.yaml", help="detector config")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.vit.arch=vit_small input.min_size_train=[320]")
    p.add_argument("--limit", type=int, default=4, help="photos used, the first in file-name order (default 4)")
    p.add_argument("--batch", type=int, default=2, help="images per iteration (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating (default 2)")
    p.add_argument("--one", choices=("cache", "plain"), help=argparse.SUPPRESS)  # a single measurement
    add_timing_args(p)
    p.set_defaults(iters=4, warmup=2)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """One run in this process: {"it_per_s", "peak_rss_mib"[, "peak_cuda_mib"], "hits", "misses"}."""
    import resource

    from detectron2_train.data import CocoInstances, collate_lists
    from detectron2_train.engine import SCHEMA
    from detectron2_train.modeling import build_model, set_image_sizes
    from utils.config import load_config

    device = timing_device(args)
    with tempfile.TemporaryDirectory() as tmp:
        data = json.loads(Path(args.json).read_text())
        images = sorted(data["images"], key=lambda im: im["file_name"])[: args.limit]
        ids = {im["id"] for im in images}
        subset = Path(tmp) / "subset.json"
        subset.write_text(json.dumps({**data, "images": images,
                                      "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
        cache = [f"model.vit.cache_dir={Path(tmp) / 'cache'}"] if args.one == "cache" else ["model.vit.cache_dir=null"]
        cfg = load_config(args.config, [f"model.vit.weights={args.weights}", *args.overrides, *cache], SCHEMA)
        dataset = CocoInstances(subset, args.images, class_agnostic=True)
        samples = [dataset[i] for i in range(len(dataset))]
        torch.manual_seed(0)
        model = build_model(cfg, 1).to(device)
        set_image_sizes(model, cfg, training=True)
        optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.001, momentum=0.9)
        model.train()
        times, cpu_times = [], []
        for it in range(args.warmup + args.iters):
            images, targets = collate_lists([samples[(it * args.batch + k) % len(samples)] for k in range(args.batch)])
            images = [im.to(device) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if it >= args.warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        body_cache = model.backbone.body.cache
        result = {"it_per_s": 1 / statistics.median(times), "cpu_s_per_it": statistics.median(cpu_times),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "hits": body_cache.hits if body_cache else 0, "misses": body_cache.misses if body_cache else 0}
        if device.type == "cuda":
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args)))
        return
    if args.warmup * args.batch < args.limit:
        print(f"note: {args.warmup} warm-up iterations of {args.batch} do not cover the {args.limit} photos: "
              f"some timed iterations with the cache will miss")
    runs: dict[str, list[dict]] = {"cache": [], "plain": []}
    argv = sys.argv[1:] if argv is None else argv
    for repeat in range(args.repeats):
        for setting in ("cache", "plain"):
            out = subprocess.run([sys.executable, __file__, *argv, "--one", setting], check=True, cwd=REPO,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            runs[setting].append(result)
            print(f"run {repeat + 1} {setting:5s}: {result['it_per_s']:.3f} it/s, {result['cpu_s_per_it']:.1f} CPU s/it, peak RSS {result['peak_rss_mib']:.0f} "
                  f"MiB, cache hits {result['hits']} misses {result['misses']}", flush=True)
    medians = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("hits", "misses")}
               for s, rs in runs.items()}
    for setting, med in medians.items():
        print(f"median {setting:5s}: {med['it_per_s']:.3f} it/s, {med['cpu_s_per_it']:.1f} CPU s/it, peak RSS {med['peak_rss_mib']:.0f} MiB"
              + (f", peak CUDA {med['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in med else ""))
    print(f"ratio cache/plain: {medians['cache']['it_per_s'] / medians['plain']['it_per_s']:.2f}x iterations/s, "
          f"{medians['plain']['cpu_s_per_it'] / medians['cache']['cpu_s_per_it']:.2f}x fewer CPU s/it, "
          f"{medians['cache']['peak_rss_mib'] / medians['plain']['peak_rss_mib']:.2f}x peak RSS "
          f"({args.limit} photos, batch {args.batch}, {args.iters} timed iterations, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    run_cli(main)
