"""Painting throughput: Mask R-CNN results (COCO JSON) -> VOC-palette label PNGs (segmentation/gen_segmentation.py).

    python benchmarks/bench_gen_segmentation.py [--copies 10] [--repeats 3] [--synthetic]
The results are tiny_coco val2017's ground truth perturbed into predictions (tests/helpers/coco_perturb.py: polygons,
str-RLE and uncompressed RLE, scores in [0, 1], false positives), the 50 images repeated `--copies` times; synthetic
VOC-sized images with a few instances when ../shared/data is absent. Each repeat repaints every PNG
(`overwrite=True`), loading of the two JSON files included. Prints images/s (median of the repeats) and peak RSS.
"""
import argparse
import contextlib
import io
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from segmentation.painting import generate_segmentation
from utils.coco_io import load_json, make_annotation, write_json
from tests.helpers.coco_perturb import perturbed_predictions

TINY_COCO_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco" / "annotations" / "instances_val2017.json"


def synthetic_results(num_images: int = 50, seed: int = 0) -> tuple[dict, list[dict]]:
    """VOC-sized images (375x500), each with 2-5 elliptical instances of random VOC classes and scores."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:375, :500]
    images, preds = [], []
    for i in range(num_images):
        images.append({"id": i + 1, "file_name": f"synthetic_{i:05d}.jpg", "height": 375, "width": 500})
        for _ in range(int(rng.integers(2, 6))):
            cy, cx = rng.integers(40, 335), rng.integers(40, 460)
            ry, rx = rng.integers(15, 120), rng.integers(15, 160)
            mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
            preds.append(make_annotation(mask, i + 1, int(rng.integers(1, 21)), float(rng.random())))
    dataset = {"images": images, "annotations": [],
               "categories": [{"id": c, "name": str(c), "supercategory": ""} for c in range(1, 21)]}
    return dataset, preds


def load_inputs(copies: int, synthetic: bool = False) -> tuple[dict, list[dict], str]:
    """(dataset, predictions, description): tiny_coco val2017 (else synthetic images) repeated `copies` times."""
    if TINY_COCO_VAL.is_file() and not synthetic:
        gt = load_json(TINY_COCO_VAL)
        base_preds, source = perturbed_predictions(gt, seed=0), "tiny_coco val2017"
    else:
        gt, base_preds = synthetic_results()
        source = "synthetic 500x375"
    offset = max(img["id"] for img in gt["images"]) + 1
    images, all_preds = [], []
    for copy in range(copies):  # new ids and file names per copy, so every copy writes its own PNGs
        images += [dict(img, id=img["id"] + copy * offset, file_name=f"copy{copy}/{img['file_name']}")
                   for img in gt["images"]]
        all_preds += [dict(p, image_id=p["image_id"] + copy * offset) for p in base_preds]
    dataset = {"images": images, "annotations": [], "categories": gt["categories"]}
    return dataset, all_preds, f"{source} x{copies}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark painting instance predictions into label PNGs.")
    parser.add_argument("--copies", type=int, default=10,
                        help="times the 50-image set is repeated (default 10: 500 images)")
    parser.add_argument("--synthetic", action="store_true",
                        help="use synthetic 500x375 images with 2-5 instances even when tiny_coco is present")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed (default 3)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score threshold of the painting (default 0.5)")
    parser.add_argument("--ignore_uncertain", action="store_true",
                        help="also paint the predictions below the threshold as 255 (more masks decoded)")
    args = parser.parse_args()
    dataset, preds, source = load_inputs(args.copies, args.synthetic)
    num_images = len(dataset["images"])
    print(f"images: {num_images} ({source}), predictions: {len(preds)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_json(tmp / "results.json", preds)
        write_json(tmp / "dataset.json", dataset)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # no progress bar in the timings
                stats = generate_segmentation(tmp / "results.json", tmp / "dataset.json", tmp / "labels",
                                              threshold=args.threshold, ignore_uncertain=args.ignore_uncertain,
                                              overwrite=True)
            times.append(time.perf_counter() - start)
            assert stats["written"] == num_images, stats
    t = statistics.median(times)
    print(f"painting: {num_images / t:.1f} img/s ({1000 * t / num_images:.1f} ms/img; median of {args.repeats}: "
          f"{', '.join(f'{x:.2f}' for x in times)} s)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (CPU only, no CUDA)")


if __name__ == "__main__":
    main()
