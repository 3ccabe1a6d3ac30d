"""Throughput of mask generation on a folder, for every discovery method, and two reference comparisons.

`--mode pipeline` runs `gen_masks.py`'s engine (`distill.engine`) with `--method` and prints images/s,
the time per image of the network, the method and the post-processing the network waited for, and
peak memory (the process's maximum resident set size, and CUDA's peak allocation on a GPU).
`--mode baseline` (MaskDistill) runs one image at a time with explicit attention in every block and
the literal N x N formulation (`distill.reference`); `--mode both` runs pipeline and baseline in their
own processes, alternating, `--repeats` times, and prints medians and the ratio. `--mode ncut` times
MaskCut's Ncut step (graph + eigensolver for its cuts) with scipy's per-image dense solver
(`eigh(D − W, D, subset_by_index=[1, 2])`, as the official code calls it) against `distill.ncut`.

  .venv/bin/python benchmarks/bench_gen_masks.py --folder ../shared/data/tiny_coco/val2017 --max_images 8
  .venv/bin/python benchmarks/bench_gen_masks.py --mode pipeline --method maskcut --max_images 16
  .venv/bin/python benchmarks/bench_gen_masks.py --mode ncut --max_images 8
  .venv/bin/python benchmarks/bench_gen_masks.py --mode precision --max_images 4 --repeats 3

`--mode precision` runs every method with `--precision fp32`, `bf16` and `auto`, alternating, and prints the
medians and auto's choice against the faster of the two.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from distill.data import InputPolicy, folder_entries, upsample_patch_mask
from distill.reference import explicit_last_qk, literal_mask
from utils.vit import build_vit
from utils.vit_archs import resolve_patch_size
from utils.coco_io import make_annotation
from utils.distributed import resolve_device
from utils.images import IMAGENET_MEAN, IMAGENET_STD, load_rgb


def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_baseline(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.weights).to(device)
    entries = folder_entries(Path(args.folder))[: args.max_images]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seconds = {"decode": 0.0, "model": 0.0, "mask": 0.0, "encode": 0.0}
    start = time.perf_counter()
    for entry in entries:
        t0 = time.perf_counter()
        img = load_rgb(entry.path)
        geometry = InputPolicy(args.resize, args.max_size, 0, args.patch_size).geometry(img.height, img.width)
        (h, w), (hp, wp) = geometry.working, geometry.network
        img = TF.resize(img, [h, w], antialias=True)
        x = (TF.pil_to_tensor(img).float() / 255 - mean) / std
        x = torch.nn.functional.pad(x, (0, wp - w, 0, hp - h))[None].to(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            qk = explicit_last_qk(model, x)
            # DINO's get_last_selfattention, which straightforward code calls, also builds the
            # last block's attention matrix.
            (qk.query @ qk.key.transpose(-2, -1) * model.vit.blocks[-1].attn.scale).softmax(dim=-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        mask = literal_mask(qk.query[0].cpu().numpy(), qk.key[0].cpu().numpy(), hp // args.patch_size,
                            wp // args.patch_size)
        t3 = time.perf_counter()
        make_annotation(upsample_patch_mask(mask, geometry), entry.image_id)
        t4 = time.perf_counter()
        for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            seconds[key] += dt
    total = time.perf_counter() - start
    return {"mode": "baseline", "images": len(entries), "seconds": total, "images_per_s": len(entries) / total,
            "s_per_image": {k: v / len(entries) for k, v in seconds.items()}, **peak_memory_mb(device)}


def pipeline_argv(args: argparse.Namespace, out: Path, half: bool) -> list[str]:
    """The `gen_masks.py` flags of a pipeline run (`--resize`/`--fixed_size` only when given)."""
    argv = ["--dataset", "folder", "--dataset_root", args.folder, "--max_images", args.max_images, "--method",
            args.method, "--arch", args.arch, "--patch_size", args.patch_size, "--weights", args.weights,
            "--max_size", args.max_size, "--pred_json_path", out, "--overwrite", "--batch_size", args.batch_size,
            "--device", args.device]
    for flag in ("resize", "fixed_size", "num_workers", "post_workers"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    return [str(a) for a in argv] + ["--precision", args.precision or ("bf16" if half else "fp32")]


def run_pipeline(args: argparse.Namespace) -> dict:
    import gen_masks
    from distill.engine import gen_masks_from_args, generate_masks

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        parser = gen_masks.build_parser()
        argv = pipeline_argv(args, Path(tmp) / "masks.json", args.half)
        stats = generate_masks(gen_masks_from_args(parser.parse_args(argv)))
        if args.keep_json:
            Path(args.keep_json).write_bytes((Path(tmp) / "masks.json").read_bytes())
    total = stats.seconds["total"]
    per_image = {k: stats.seconds[k] / stats.images for k in ("model", "mask", "post")}
    return {"mode": "pipeline", "method": args.method, "images": stats.images, "masks": stats.annotations,
            "seconds": total, "images_per_s": stats.images / total, "s_per_image": per_image,
            **peak_memory_mb(device)}


def scipy_solver(graphs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official TokenCut/MaskCut solve, one image at a time: numpy D and W, scipy's dense `eigh`."""
    import scipy.linalg

    values, vectors = [], []
    for w in graphs.cpu().numpy():
        d = np.diag(w.sum(axis=1))
        value, vector = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 2])
        values.append(value[0])
        vectors.append(vector[:, 0])
    return torch.tensor(np.array(values)), torch.from_numpy(np.stack(vectors))


def ncut_step(args: argparse.Namespace) -> dict:
    """MaskCut's patch level (its graphs, eigensolves and partitions for 3 cuts) on real backbone
    features, with scipy's per-image solver and with `distill.ncut`'s batched one; both must agree."""
    from distill.features import feature_setting
    from distill.maskcut import maskcut
    from distill.methods import backbone_features

    device = resolve_device(args.device)
    model = build_vit(args.arch, args.patch_size, args.weights).to(device)
    entries = folder_entries(Path(args.folder))[: args.max_images]
    policy = InputPolicy(0, args.max_size, args.fixed_size or 480, model.patch_size)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    images = []
    for entry in entries:
        img = load_rgb(entry.path)
        geometry = policy.geometry(img.height, img.width)
        img = img.resize(geometry.working[::-1], Image.LANCZOS).resize(geometry.network[::-1], Image.LANCZOS)
        images.append((TF.pil_to_tensor(img).float() / 255 - mean) / std)
    with torch.inference_mode():
        features = backbone_features(model, torch.stack(images).to(device), feature_setting(args.arch))
        keys = features.patch_keys
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        runs, results = {"scipy": [], "torch": []}, {}
        for _ in range(args.repeats):  # alternating, so that load changes hit both alike
            for name, solver in (("scipy", scipy_solver), ("torch", None)):
                start = time.perf_counter()
                results[name] = maskcut(keys, features.grid, **({"solver": solver} if solver else {}))
                sync()
                runs[name].append(time.perf_counter() - start)
        timings = {name: float(np.median(seconds)) for name, seconds in runs.items()}
    same = all(np.array_equal(a.mask, b.mask) for ra, rb in zip(results["scipy"], results["torch"])
               for a, b in zip(ra, rb)) and all(len(a) == len(b) for a, b in zip(results["scipy"], results["torch"]))
    return {"mode": "ncut", "images": len(entries), "patches": keys.shape[1],
            "scipy_s_per_image": timings["scipy"] / len(entries), "torch_s_per_image": timings["torch"] / len(entries),
            "speed_up": timings["scipy"] / timings["torch"], "runs_s": runs,
            "paired_ratios": [a / b for a, b in zip(runs["scipy"], runs["torch"])], "identical_masks": same,
            **peak_memory_mb(device)}


def half_agreement(args: argparse.Namespace) -> dict:
    """Mask agreement between the pipeline in fp32 and in bf16 (`--precision bf16`), image by image:
    Hungarian-matched mask IoU (`distill.quality.matched_mask_iou`), so methods with several masks
    per image (MaskCut) are compared mask for mask."""
    from distill.quality import mask_file_agreement

    runs = {}
    for half in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            run_args = argparse.Namespace(**{**vars(args), "half": half, "keep_json": str(Path(tmp) / "m.json")})
            timing = run_pipeline(run_args)
            runs[half] = (json.loads(Path(run_args.keep_json).read_text()), timing["images_per_s"])
    ious = list(mask_file_agreement(runs[False][0], runs[True][0]).values())
    return {"method": args.method, "images": len(ious), "masks_fp32": len(runs[False][0]["annotations"]),
            "masks_bf16": len(runs[True][0]["annotations"]), "mean_iou": float(np.mean(ious)),
            "median_iou": float(np.median(ious)), "identical_images": int(sum(i == 1.0 for i in ious)),
            "fp32_images_per_s": runs[False][1], "bf16_images_per_s": runs[True][1]}


def precision_runs(args: argparse.Namespace) -> dict:
    """Every method's whole `gen_masks.py` job with --precision fp32, bf16 and auto, each run its own process,
    alternating `--repeats` times; medians, and auto against the faster of fp32 and bf16. auto's choice is
    measured in the first auto run of each method (into $MASKDISTILL_CACHE) and read from the cache after."""
    forwarded = [a for a in sys.argv[1:] if a not in ("--mode", "precision", "--methods", args.methods)]
    table = {}
    for method in args.methods.split(","):
        runs: dict[str, list[float]] = {"fp32": [], "bf16": [], "auto": []}
        for _ in range(args.repeats):
            for name in runs:
                out = subprocess.run([sys.executable, __file__, *forwarded, "--mode", "pipeline", "--method", method,
                                      "--precision", name], check=True, capture_output=True, text=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
                if name == "auto":
                    chosen = [line for line in out.stderr.splitlines() if line.startswith("precision ")][-1]
        medians = {name: statistics.median(values) for name, values in runs.items()}
        faster = max(medians["fp32"], medians["bf16"])
        table[method] = {"images_per_s": runs, "medians": medians, "auto_chose": chosen,
                         "auto_vs_faster": medians["auto"] / faster}
        print(f"{method:12s} images/s median fp32 {medians['fp32']:.3f}  bf16 {medians['bf16']:.3f}  "
              f"auto {medians['auto']:.3f} ({medians['auto'] / faster:.2f}x the faster) | {chosen}", flush=True)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(Path(__file__).resolve().parents[2] / "shared/data/tiny_coco/val2017"),
                   help="folder of images (default: ../shared/data/tiny_coco/val2017)")
    p.add_argument("--mode", default="both", choices=["both", "pipeline", "baseline", "half_agreement", "ncut", "precision"],
                   help="what to run: both timings (maskdistill), one of them, the mask IoU of --half against "
                        "fp32, MaskCut's Ncut step with scipy vs distill.ncut, or every method with "
                        "--precision fp32, bf16 and auto")
    p.add_argument("--method", default="maskdistill", choices=["maskdistill", "lost", "tokencut", "maskcut"],
                   help="pipeline: the discovery method (default: %(default)s)")
    p.add_argument("--methods", default="maskdistill,lost,tokencut,maskcut",
                   help="--mode precision: comma-separated methods (default: %(default)s)")
    p.add_argument("--max_images", type=int, default=8, help="images per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode with --mode both or ncut (alternating); medians are reported")
    p.add_argument("--arch", default="vit_small", help="vit_small, vit_base, dinov2_vits14, ... (see utils/vit.py)")
    p.add_argument("--patch_size", type=int, default=None, help="16 or 8 for DINO, 14 for DINOv2 (default: the arch's)")
    p.add_argument("--weights", default="random", help="random (timing only), dino, or a checkpoint path")
    p.add_argument("--resize", type=int, default=None, help="shorter side (default: the method's; baseline 640)")
    p.add_argument("--fixed_size", type=int, default=None, help="square size (default: the method's)")
    p.add_argument("--max_size", type=int, default=2048, help="longer-side cap (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="pipeline batch size (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=None, help="pipeline DataLoader workers")
    p.add_argument("--post_workers", type=int, default=None, help="pipeline post-processing processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--half", action="store_true", help="pipeline with bf16 autocast")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="pipeline: gen_masks.py --precision (default: bf16 with --half, else fp32)")
    p.add_argument("--keep_json", help="pipeline: copy the output masks JSON here (for agreement checks)")
    args = p.parse_args()
    args.patch_size = resolve_patch_size(args.arch, args.patch_size)

    if args.mode == "half_agreement":
        print(json.dumps(half_agreement(args)))
        return
    if args.mode == "precision":
        print(json.dumps(precision_runs(args)))
        return
    if args.mode == "ncut":
        print(json.dumps(ncut_step(args)))
        return
    if args.mode in ("baseline", "both"):
        args.method, args.resize = "maskdistill", args.resize or 640
    if args.mode != "both":
        result = run_pipeline(args) if args.mode == "pipeline" else run_baseline(args)
        print(json.dumps(result))
        return
    runs: dict[str, list[dict]] = {"pipeline": [], "baseline": []}
    forwarded = [a for a in sys.argv[1:] if a not in ("--mode", "both")]
    for _ in range(args.repeats):
        for mode in ("baseline", "pipeline"):  # alternate, so that load changes hit both alike
            out = subprocess.run([sys.executable, __file__, *forwarded, "--mode", mode], check=True,
                                 capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.max_images} images from {args.folder}, {args.arch}/{args.patch_size} at {args.resize}, "
          f"device {resolve_device(args.device)}, {args.repeats} runs each (medians)")
    for mode, results in runs.items():
        ips = statistics.median(r["images_per_s"] for r in results)
        split = {k: statistics.median(r["s_per_image"][k] for r in results) for k in results[0]["s_per_image"]}
        rss = statistics.median(r["peak_rss_mb"] for r in results)
        split_text = ", ".join(f"{k} {v:.3f}" for k, v in split.items())
        print(f"{mode:9s} {ips:6.2f} images/s | s/image: {split_text} | peak RSS {rss:.0f} MB"
              + (f" | peak CUDA {statistics.median(r['peak_cuda_mb'] for r in results):.0f} MB"
                 if "peak_cuda_mb" in results[0] else ""))
    ratio = statistics.median(p["images_per_s"] / b["images_per_s"] for p, b in zip(runs["pipeline"], runs["baseline"]))
    print(f"speed-up (median of paired runs): {ratio:.2f}x")


if __name__ == "__main__":
    main()
