"""What input validation (utils/validate.py, run by every load_coco_dataset / load_predictions) costs.

    python benchmarks/bench_validate.py --masks 2000 --repeats 5

Two files: tiny_coco's val2017 GT (polygons, crowd RLE), and a results list of --masks compressed RLE masks on
480x640 images (gen_masks-like output). For each: JSON parsing alone, the checked load, and, for scale, decoding
every mask with pycocotools. Medians of --repeats runs taken alternately; prints masks/s and peak RSS.
"""
import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"),
                   help="tiny_coco folder")
    p.add_argument("--masks", type=int, default=2000, help="RLE masks in the synthetic results file (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="runs per measurement (default: %(default)s)")
    args = p.parse_args()

    import numpy as np
    from pycocotools import mask as mask_utils

    from utils.coco_io import load_coco_dataset, load_json, load_predictions, mask_to_rle

    rng = np.random.default_rng(0)
    results = []
    for i in range(args.masks):
        mask = np.zeros((480, 640), dtype=np.uint8)
        y, x = rng.integers(0, 300, 2)
        mask[y:y + int(rng.integers(40, 180)), x:x + int(rng.integers(40, 300))] = 1
        mask[rng.random(mask.shape) < 0.002] = 1  # ragged: longer counts strings than a plain box
        results.append({"image_id": i, "category_id": 1, "segmentation": mask_to_rle(mask), "score": 0.9})
    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(tmp) / "results.json"
        pred_path.write_text(json.dumps(results))
        gt_path = Path(args.data) / "annotations" / "instances_val2017.json"
        cases = [("tiny_coco val GT", gt_path, load_coco_dataset, len(load_json(gt_path)["annotations"])),
                 (f"{args.masks} RLE results", pred_path, load_predictions, args.masks)]
        for name, path, checked_load, count in cases:
            parse, checked = [], []
            for _ in range(args.repeats):
                parse.append(timed(lambda: load_json(path)))
                checked.append(timed(lambda: checked_load(path)))
            parse_s, checked_s = statistics.median(parse), statistics.median(checked)
            line = (f"{name}: {count} annotations, {path.stat().st_size / 1e6:.1f} MB; JSON parse {parse_s * 1e3:.1f} ms, "
                    f"checked load {checked_s * 1e3:.1f} ms ({checked_s / parse_s:.2f}x parse, "
                    f"{count / (checked_s - parse_s):.0f} annotations/s checked)")
            if path == pred_path:
                anns = load_json(path)
                decode_s = statistics.median(timed(lambda: [mask_utils.decode(a["segmentation"]) for a in anns])
                                             for _ in range(args.repeats))
                line += f"; decoding every mask {decode_s * 1e3:.1f} ms"
            print(line)
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
