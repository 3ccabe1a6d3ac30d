"""Issue 21's proof on ../shared/data/pets: does a detector trained on a discovery method's pseudo-masks beat them?

  python benchmarks/bench_route_pets.py --weights CKPT --out output/route_pets                 # all 600 photos
  python benchmarks/bench_route_pets.py --weights CKPT --out output/route_small --limit 24 --iters 20   # a look

Split: the photos in sorted file-name order (the first `--limit`), every 6th held out (100 of 600); the others
are used without labels. Steps, each an entry point run as written in the docs:
  1. gen_masks.py (`--method`, DINOv2 ViT-S/14 `--weights`) on the training photos and on the held-out ones;
  2. train_net.py with configs/detectron2/vit_dinov2_s14_cpu.yaml (the same ViT, frozen, token cache) on the
     training photos' pseudo-masks, predicting the held-out photos;
  3. eval_instances.py (class-agnostic mask AP, AP50) and eval_corloc.py (CorLoc) of (a) the held-out photos'
     pseudo-masks and (b) the detector's predictions, against the held-out GT masks.
Prints the table and writes OUT/route.json. Steps whose outputs exist are not rerun.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from utils.coco_io import write_json
from utils.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
PETS = REPO.parent / "shared" / "data" / "pets"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="DINOv2 ViT-S/14 checkpoint (gen_masks.py --weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pets", default=str(PETS), help="pets folder: images/ and annotations/instances.json")
    p.add_argument("--method", default="lost", choices=("lost", "tokencut", "maskcut", "maskdistill"),
                   help="discovery method (default lost)")
    p.add_argument("--limit", type=int, default=0, help="use the first N photos in file-name order (0: all)")
    p.add_argument("--iters", type=int, default=None, help="detector iterations (default: the config's)")
    p.add_argument("--config", default="configs/detectron2/vit_dinov2_s14_cpu.yaml", help="detector config")
    p.add_argument("--device", default="cpu", help="device of every step (default cpu)")
    return p.parse_args(argv)


def split(gt: dict, limit: int) -> tuple[dict, dict]:
    """(training set, held-out set): sorted by file name, every 6th photo held out."""
    images = sorted(gt["images"], key=lambda im: im["file_name"])
    images = images[:limit] if limit else images
    held = [im for i, im in enumerate(images) if i % 6 == 5]
    kept = [im for i, im in enumerate(images) if i % 6 != 5]

    def subset(chosen: list[dict]) -> dict:
        ids = {im["id"] for im in chosen}
        return {**gt, "images": chosen, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}

    return subset(kept), subset(held)


def step(name: str, command: list, done: Path, log: Path) -> float:
    """Run one entry point unless `done` exists; returns its seconds."""
    if done.exists():
        print(f"{name}: {done} exists, kept", flush=True)
        return 0.0
    start = time.perf_counter()
    print(f"{name}: {' '.join(map(str, command))}", flush=True)
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise UserError(f"{name} failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - start


def scores(pred: Path, gt: Path, out: Path, log_dir: Path) -> dict:
    """Class-agnostic mask AP and AP50 (eval_instances.py) and CorLoc (eval_corloc.py) of `pred` against `gt`."""
    step(f"evaluate {pred.name}", ["eval_instances.py", "--input_file", pred, "--gt_file", gt, "--class_agnostic",
                                   "--out_json", out.with_suffix(".ap.json"), "--overwrite"],
         out.with_suffix(".ap.json"), log_dir / f"{out.stem}_ap.log")
    step(f"corloc {pred.name}", ["eval_corloc.py", "--input_file", pred, "--gt_file", gt,
                                 "--out_json", out.with_suffix(".corloc.json"), "--overwrite"],
         out.with_suffix(".corloc.json"), log_dir / f"{out.stem}_corloc.log")
    ap = json.loads(out.with_suffix(".ap.json").read_text())
    corloc = json.loads(out.with_suffix(".corloc.json").read_text())
    segm = ap["metrics"]["segm"]
    return {"mask AP": segm["AP"], "mask AP50": segm["AP50"], "CorLoc": corloc["CorLoc"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    pets, out = Path(args.pets), Path(args.out)
    gt_path = pets / "annotations" / "instances.json"
    if not gt_path.is_file():
        raise UserError(f"no pets annotations at {gt_path} (--pets)")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    train_gt, test_gt = split(json.loads(gt_path.read_text()), args.limit)
    write_json(out / "train_gt.json", train_gt)
    write_json(out / "test_gt.json", test_gt)
    print(f"{len(train_gt['images'])} training photos (labels unused), {len(test_gt['images'])} held out", flush=True)
    seconds = {}
    for part in ("train", "test"):
        pseudo = out / f"pseudo_{part}.json"
        seconds[f"gen_masks {part}"] = step(f"gen_masks {part}", [
            "gen_masks.py", "--dataset", "folder", "--dataset_root", pets / "images", "--gt_json", out / f"{part}_gt.json",
            "--skip_images_not_in_gt", "--arch", "dinov2_vits14", "--weights", args.weights, "--method", args.method,
            "--device", args.device, "--pred_json_path", pseudo], pseudo, logs / f"gen_masks_{part}.log")
    detector = out / "detector"
    overrides = [f"model.vit.weights={args.weights}"] + ([f"solver.max_iter={args.iters}"] if args.iters else [])
    results = detector / "inference" / "results.json"
    seconds["detector"] = step("detector", [
        "detectron2_train/train_net.py", "--config", args.config, "--device", args.device,
        "--train_json", out / "pseudo_train.json", "--train_root", pets / "images", "--test_json", out / "test_gt.json",
        "--test_root", pets / "images", "--output_dir", detector, "--no_eval", "--set", *overrides], results,
        logs / "detector.log")
    table = {f"(a) {args.method} pseudo-masks": scores(out / "pseudo_test.json", out / "test_gt.json",
                                                       out / "pseudo_test_scores", logs),
             "(b) detector on them": scores(results, out / "test_gt.json", out / "detector_scores", logs)}
    print(f"held-out {len(test_gt['images'])} photos, class-agnostic, against the GT masks:")
    for row, values in table.items():
        print(f"  {row:32s} " + "  ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in values.items()))
    write_json(out / "route.json", {"method": args.method, "limit": args.limit, "iters": args.iters,
                                    "held_out": len(test_gt["images"]), "table": table, "seconds": seconds}, indent=2)


if __name__ == "__main__":
    run_cli(main)
