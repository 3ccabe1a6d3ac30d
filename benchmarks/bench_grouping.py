"""Speed and memory of GGN's grouping and ranking on CPU (distill/grouping.py), and the oracle's recall.

For each of the first --max_images images of a COCO JSON, the whole per-image process of
`gen_pa_masks.py --affinity oracle`: the PA map of its GT instances, the grouping (superpixels,
region graph with globalisation, hierarchy, ranking) and the top-k masks encoded as COCO
annotations. `--noise S` blurs the oracle map and adds smooth noise of standard deviation S,
which mimics a learned predictor's map and gives several hundred superpixels per image (the
oracle gives a few dozen): the speed figure that matters for real use.

Prints seconds per image (median, 90th percentile, max) for the whole process and per stage,
images/s, the CPU seconds per image (the process's own CPU time: on a machine shared with other
jobs it estimates the unloaded wall time, the code being single-threaded), superpixels and candidates per image, the recall at IoU 0.5 among the top-k masks of
GT instances of at least 32 x 32 pixels (area), and the process's peak RSS.

  .venv/bin/python benchmarks/bench_grouping.py --max_images 50
  .venv/bin/python benchmarks/bench_grouping.py --max_images 50 --noise 0.06
  .venv/bin/python benchmarks/bench_grouping.py --max_images 50 --globalization 0
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi

from distill.grouping import GroupingOptions, group, oracle_affinity
from utils.coco_io import annotations_by_image, load_coco_dataset, make_annotation, segmentation_to_rle

DEFAULT_GT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco" / "annotations" / "instances_val2017.json"


def noisy(pa: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """A learned-looking map: blurred (sigma 2 px) plus smooth noise (sigma 2 px) of standard deviation `std`."""
    field = ndi.gaussian_filter(rng.standard_normal(pa.shape), 2.0)
    return np.clip(ndi.gaussian_filter(pa, 2.0) + std * field / field.std(), 0, 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt_json", default=str(DEFAULT_GT), help="COCO instances JSON (default: tiny_coco val2017)")
    p.add_argument("--max_images", type=int, default=50, help="first N images (default: %(default)s)")
    p.add_argument("--noise", type=float, default=0.0, help="std of the smooth noise added to the blurred oracle map (0: exact oracle)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--globalization", type=float, default=GroupingOptions.globalization,
                   help="weight of the spectral boundary (default: %(default)s; 0 = off)")
    p.add_argument("--topk", type=int, default=GroupingOptions.topk, help="masks kept per image (default: %(default)s)")
    args = p.parse_args()

    gt = load_coco_dataset(args.gt_json)
    by_image = annotations_by_image(gt["annotations"])
    options = GroupingOptions(globalization=args.globalization, topk=args.topk)
    rng = np.random.default_rng(args.seed)
    group(np.ones((8, 8), np.float32), options)  # imports and first-call set-up out of the timings
    totals, cpu, stages, regions, candidates = [], [], {}, [], []
    found = total = 0
    for image in gt["images"][: args.max_images]:
        anns = by_image.get(image["id"], [])
        height, width = image["height"], image["width"]
        start, start_cpu = time.perf_counter(), time.process_time()
        pa = oracle_affinity(anns, height, width)
        if args.noise > 0:
            pa = noisy(pa, args.noise, rng)  # not timed as part of the process: it stands in for a model
            start, start_cpu = time.perf_counter(), time.process_time()
        proposals = group(pa, options)
        outputs = [make_annotation(m, image["id"], 1, float(s)) for m, s in zip(proposals.masks, proposals.scores)]
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        for stage, seconds in proposals.seconds.items():
            stages.setdefault(stage, []).append(seconds)
        regions.append(proposals.num_superpixels)
        candidates.append(proposals.num_candidates)
        for ann in anns:  # recall, outside the timings
            rle = segmentation_to_rle(ann["segmentation"], height, width)
            if ann.get("iscrowd", 0) or mask_utils.area(rle) < 32 * 32:
                continue
            total += 1
            if outputs:
                found += mask_utils.iou([o["segmentation"] for o in outputs], [rle], [0]).max() >= 0.5

    totals = np.array(totals)
    mode = f"oracle + noise {args.noise:g}" if args.noise > 0 else "oracle"
    print(f"{len(totals)} images ({mode}), globalization {args.globalization:g}, top-{args.topk}")
    print(f"whole process: median {np.median(totals):.3f} s/image, p90 {np.percentile(totals, 90):.3f}, "
          f"max {totals.max():.3f}; {len(totals) / totals.sum():.2f} images/s")
    print(f"CPU time: median {np.median(cpu):.3f} s/image, p90 {np.percentile(cpu, 90):.3f}, max {max(cpu):.3f}")
    print("stages (median s/image): " + "  ".join(f"{k} {np.median(v):.3f}" for k, v in stages.items()))
    print(f"superpixels per image: median {np.median(regions):.0f}, max {max(regions)}; "
          f"candidates: median {np.median(candidates):.0f}, max {max(candidates)}")
    print(f"recall@0.5 of GT >= 32x32 among the top-{args.topk}: {found}/{total} = {found / max(total, 1):.3f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
