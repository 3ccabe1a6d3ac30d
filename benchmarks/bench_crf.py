"""Dense CRF throughput: label refinement (voc_mini images, or synthetic ones) and 21-class softmax refinement.

    python benchmarks/bench_crf.py [--repeats 3] [--workers 2]
Prints images/s (median of the repeats) and peak memory.
"""
import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from segmentation.crf import refine_folder
from utils.crf import dense_crf, refine_labels
from utils.images import load_rgb
from utils.label_png import read_label_png, write_label_png

VOC = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_mini" / "VOCdevkit" / "VOC2012"


def blocky(label, block=16):
    h, w = label.shape
    rows = np.minimum((np.arange(h) // block) * block + block // 2, h - 1)
    cols = np.minimum((np.arange(w) // block) * block + block // 2, w - 1)
    return label[rows][:, cols]


def load_pairs():
    if VOC.is_dir():
        names = sorted(p.stem for p in (VOC / "SegmentationClass").glob("*.png"))
        return [(np.array(load_rgb(VOC / "JPEGImages" / f"{n}.jpg")), read_label_png(VOC / "SegmentationClass" / f"{n}.png"))
                for n in names], "voc_mini"
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        label = np.zeros((375, 500), np.uint8)
        label[100:300, 120:380] = 15
        image = np.clip(np.where(label[..., None] > 0, 180, 60) + rng.normal(0, 20, (375, 500, 3)), 0, 255).astype(np.uint8)
        pairs.append((image, label))
    return pairs, "synthetic 500x375"


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description="Benchmark the dense CRF (labels, softmax, folder pool).")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="pool size for the folder benchmark (default 2)")
    args = parser.parse_args()
    pairs, source = load_pairs()
    print(f"images: {len(pairs)} from {source}, sizes {[p[1].shape for p in pairs]}")
    t = timed(lambda: [refine_labels(img, blocky(lab)) for img, lab in pairs], args.repeats)
    print(f"refine_labels (classes present only): {len(pairs) / t:.2f} img/s ({1000 * t / len(pairs):.0f} ms/img)")
    rng = np.random.default_rng(0)
    soft = [rng.dirichlet(np.ones(21), size=lab.shape).transpose(2, 0, 1).astype(np.float32) for _, lab in pairs]
    t = timed(lambda: [dense_crf(img, p) for (img, _), p in zip(pairs, soft)], 1)
    print(f"dense_crf 21-class softmax: {len(pairs) / t:.2f} img/s ({1000 * t / len(pairs):.0f} ms/img)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (img, lab) in enumerate(pairs * 2):
            from PIL import Image
            Image.fromarray(img).save(tmp / f"im{i}.png")
            write_label_png(tmp / "masks" / f"im{i}.png", blocky(lab))
        for workers in sorted({1, args.workers}):
            t = timed(lambda: refine_folder(tmp, tmp / "masks", tmp / f"out{workers}", workers, overwrite=True),
                      args.repeats)
            print(f"crf.py folder, {workers} worker(s): {2 * len(pairs) / t:.2f} img/s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (main process)")


if __name__ == "__main__":
    main()
