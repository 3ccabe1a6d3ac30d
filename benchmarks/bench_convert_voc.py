"""convert_voc throughput: VOC SegmentationObject + SegmentationClass PNGs -> COCO instances (utils/voc.py).

    python benchmarks/bench_convert_voc.py [--source auto|voc_mini|synthetic] [--images 150] [--repeats 3]
voc_mini's 3 real images (about 500x375, 12 instances) are copied under new names into a temporary VOC folder until
there are `--images` of them; `synthetic` writes VOC-sized palette PNGs with 2-6 instances and void
boundaries instead (the default when ../shared/data is absent). Prints images/s (median) and peak RSS.
"""
import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils.label_png import IGNORE_INDEX, write_label_png
from utils.voc import convert_voc_instances

VOC_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc_mini" / "VOCdevkit" / "VOC2012"


def copy_voc_mini(root: Path, num_images: int) -> None:
    """voc_mini's label PNGs under new VOC-style names (3000_000000, ...), cycling over the 3 images."""
    names = sorted(p.stem for p in (VOC_MINI / "SegmentationObject").glob("*.png"))
    for i in range(num_images):
        for sub in ("SegmentationObject", "SegmentationClass"):
            shutil.copyfile(VOC_MINI / sub / f"{names[i % len(names)]}.png", root / sub / f"3000_{i:06d}.png")


def write_synthetic(root: Path, num_images: int, seed: int = 0) -> None:
    """375x500 object/class maps: 2-6 overlapping ellipses of random VOC classes, 255 on each instance's outline."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:375, :500]
    for i in range(num_images):
        objects = np.zeros((375, 500), np.uint8)
        classes = np.zeros((375, 500), np.uint8)
        for inst in range(1, int(rng.integers(2, 7)) + 1):
            cy, cx, ry, rx = rng.integers(40, 335), rng.integers(40, 460), rng.integers(15, 120), rng.integers(15, 160)
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            objects[mask], classes[mask] = inst, int(rng.integers(1, 21))
        # VOC draws a void band along the object boundaries.
        edges = ndimage.grey_dilation(objects, size=3) != ndimage.grey_erosion(objects, size=3)
        objects[edges] = classes[edges] = IGNORE_INDEX
        write_label_png(root / "SegmentationObject" / f"3000_{i:06d}.png", objects)
        write_label_png(root / "SegmentationClass" / f"3000_{i:06d}.png", classes)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the VOC label PNG -> COCO instances conversion.")
    parser.add_argument("--source", choices=("auto", "voc_mini", "synthetic"), default="auto",
                        help="auto (default): voc_mini when ../shared/data has it, else synthetic")
    parser.add_argument("--images", type=int, default=150, help="images to convert per repeat (default 150)")
    parser.add_argument("--mask_format", choices=("rle", "polygon"), default="rle",
                        help="mask encoding of the output, as convert_voc.py --mask_format (default rle)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed (default 3)")
    args = parser.parse_args()
    source = args.source
    if source == "auto":
        source = "voc_mini" if VOC_MINI.is_dir() else "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC2012"
        for sub in ("SegmentationObject", "SegmentationClass"):
            (root / sub).mkdir(parents=True)
        (copy_voc_mini if source == "voc_mini" else write_synthetic)(root, args.images)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            data = convert_voc_instances(root, "all", mask_format=args.mask_format, progress=False)
            times.append(time.perf_counter() - start)
    t = statistics.median(times)
    pixels = sum(img["width"] * img["height"] for img in data["images"]) / len(data["images"])
    print(f"images: {args.images} ({source}, {pixels / 1e3:.0f}k pixels on average), "
          f"instances: {len(data['annotations'])}")
    print(f"convert_voc ({args.mask_format}): {args.images / t:.1f} img/s ({1000 * t / args.images:.1f} ms/img; "
          f"median of {args.repeats}: {', '.join(f'{x:.2f}' for x in times)} s)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (CPU only, no CUDA)")


if __name__ == "__main__":
    main()
