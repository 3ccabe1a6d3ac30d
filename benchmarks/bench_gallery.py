"""Gallery writing speed: `make_gallery.py` over tiny_coco val2017 (distill/gallery.py), and gen_masks' per-image
--vis_dir drawing (distill/visualize.py: save_overlay).

    python benchmarks/bench_gallery.py [--images 50] [--repeats 3]

The masks are real shapes: column "gt-as-masks" is tiny_coco's GT (7.6 masks an image on average, scored by
area), column "boxes" the same objects as box masks; the GT is the third column (--gt_json). Prints the
median seconds and images/s of a whole gallery (thumbnails, 3 columns of layers, IoUs, the page), the
page's size on disk, the median milliseconds of one `save_overlay` (MaskCut-like: 3 masks), and peak RSS.
"""
import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from distill.gallery import build_gallery
from distill.visualize import overlay_name, save_overlay
from utils.coco_io import OBJECT_CATEGORY, decode_segmentation, make_annotation
from utils.images import load_rgb

TINY_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"


def masks_files(folder: Path, num_images: int) -> tuple[list[str], str]:
    gt = json.loads((TINY_COCO / "annotations" / "instances_val2017.json").read_text())
    images = sorted(gt["images"], key=lambda i: i["file_name"])[:num_images]
    ids = {i["id"] for i in images}
    sizes = {i["id"]: (i["height"], i["width"]) for i in images}
    anns = [a for a in gt["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0)]
    as_masks, boxes = [], []
    for a in anns:
        height, width = sizes[a["image_id"]]
        score = min(1.0, a["area"] / (height * width) * 4)
        as_masks.append(make_annotation(decode_segmentation(a["segmentation"], height, width), a["image_id"],
                                        score=score))
        box = np.zeros((height, width), bool)
        x, y, w, h = (int(round(v)) for v in a["bbox"])
        box[y:y + max(1, h), x:x + max(1, w)] = True
        boxes.append(make_annotation(box, a["image_id"], score=score))
    paths = []
    for name, annotations in (("gt-as-masks", as_masks), ("boxes", boxes)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"info": {"settings": {"method": name, "weights": "dino"}}, "images": images,
                                    "annotations": annotations, "categories": [OBJECT_CATEGORY]}))
        paths.append(str(path))
    return paths, str(TINY_COCO / "annotations" / "instances_val2017.json")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark writing an HTML gallery of masks.")
    parser.add_argument("--images", type=int, default=50, help="tiny_coco val images in the gallery (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default 3)")
    args = parser.parse_args()
    if not TINY_COCO.is_dir():
        sys.exit(f"error: tiny_coco not found at {TINY_COCO}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        masks, gt = masks_files(tmp, args.images)
        seconds = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            build_gallery(tmp / f"out{repeat}", TINY_COCO / "val2017", masks, gt_json=gt)
            seconds.append(time.perf_counter() - start)
        page_kb = (tmp / "out0" / "index.html").stat().st_size / 1024
        total_mb = folder_size(tmp / "out0") / 2**20
        # gen_masks --vis_dir: one image's overlay PNG, thumbnail, layers and caption (3 masks, as MaskCut)
        image_path = sorted((TINY_COCO / "val2017").glob("*.jpg"))[0]
        image = load_rgb(image_path)
        masks_3 = []
        for k in range(3):
            mask = np.zeros((image.height, image.width), bool)
            mask[40 + 60 * k: 160 + 60 * k, 50 + 90 * k: 250 + 90 * k] = True
            masks_3.append(mask)
        overlay_ms = []
        for repeat in range(max(5, args.repeats)):
            start = time.perf_counter()
            save_overlay(image, masks_3, [0.9, 0.6, 0.3], [None, None, None], tmp / "vis" / overlay_name(image_path.name),
                         file_name=image_path.name, source=image_path)
            overlay_ms.append(1000 * (time.perf_counter() - start))
    median = statistics.median(seconds)
    print(f"gallery of {args.images} images x 3 columns: {median:.2f} s median "
          f"({', '.join(f'{s:.2f}' for s in seconds)}), {args.images / median:.1f} images/s; "
          f"index.html {page_kb:.0f} KiB, folder {total_mb:.1f} MiB")
    print(f"save_overlay (--vis_dir, 3 masks, {image.width}x{image.height}): {statistics.median(overlay_ms):.1f} ms median")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
