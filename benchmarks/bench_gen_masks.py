"""Throughput of mask generation on a folder: the pipeline vs the straightforward baseline.

`--mode pipeline` runs `distill.generate.generate` (DataLoader workers, size-grouped batches,
fused attention, no N x N graph). `--mode baseline` runs one image at a time with explicit
attention in every block and the literal N x N formulation (`distill.reference`). `--mode both`
runs each in its own process, alternating, `--repeats` times, and prints medians and the ratio.
Peak memory is the process's maximum resident set size (and CUDA's peak allocation on GPU).

  .venv/bin/python benchmarks/bench_gen_masks.py --folder ../shared/data/tiny_coco/val2017 --max_images 8
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

sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402

from distill.data import folder_entries, padded_size, resized_size, upsample_patch_mask  # noqa: E402
from distill.reference import explicit_last_qk, literal_mask  # noqa: E402
from distill.vit import build_vit, resolve_patch_size  # noqa: E402
from utils.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from utils.coco_io import make_annotation  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.images import load_rgb  # noqa: E402


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
        h, w = resized_size(img.height, img.width, args.resize, args.max_size)
        img = TF.resize(img, [h, w], antialias=True)
        x = (TF.pil_to_tensor(img).float() / 255 - mean) / std
        hp, wp = padded_size(h, w, args.patch_size)
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
        make_annotation(upsample_patch_mask(mask, args.patch_size, (h, w), (img.height, img.width)), entry.image_id)
        t4 = time.perf_counter()
        for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            seconds[key] += dt
    total = time.perf_counter() - start
    return {"mode": "baseline", "images": len(entries), "seconds": total, "images_per_s": len(entries) / total,
            "s_per_image": {k: v / len(entries) for k, v in seconds.items()}, **peak_memory_mb(device)}


def run_pipeline(args: argparse.Namespace) -> dict:
    from distill.generate import generate

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        gen_args = argparse.Namespace(
            dataset="folder", dataset_root=args.folder, year=None, set=None, voc_split_folder=None, coco_json=None,
            file_list=None, image_ids="auto", max_images=args.max_images, arch=args.arch, patch_size=args.patch_size,
            weights=args.weights, features="auto", heads=5, topk=0.4, resize=args.resize, max_size=args.max_size,
            pred_json_path=str(Path(tmp) / "masks.json"), mask_format="rle", overwrite=True, resume=False,
            shard="0/1", merge=False, vis_dir=None, batch_size=args.batch_size, num_workers=args.num_workers,
            device=args.device, precision="bf16" if args.half else "fp32")
        stats = generate(gen_args)
        if args.keep_json:
            Path(args.keep_json).write_bytes((Path(tmp) / "masks.json").read_bytes())
    total = stats.seconds["total"]
    per_image = {k: stats.seconds[k] / stats.images for k in ("model", "mask", "encode")}
    return {"mode": "pipeline", "images": stats.images, "seconds": total, "images_per_s": stats.images / total,
            "s_per_image": per_image, **peak_memory_mb(device)}


def half_agreement(args: argparse.Namespace) -> dict:
    """Mask IoU between the pipeline in fp32 and under bf16 autocast (`--half`), image by image."""
    from utils.coco_io import decode_segmentation

    masks = {}
    for half in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            run_args = argparse.Namespace(**{**vars(args), "half": half, "keep_json": str(Path(tmp) / "m.json")})
            timing = run_pipeline(run_args)
            data = json.loads(Path(run_args.keep_json).read_text())
        sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
        masks[half] = ({a["image_id"]: decode_segmentation(a["segmentation"], *sizes[a["image_id"]])
                        for a in data["annotations"]}, timing["images_per_s"])
    ious = []
    for image_id, fp32 in masks[False][0].items():
        bf16 = masks[True][0][image_id]
        union = np.logical_or(fp32, bf16).sum()
        ious.append(np.logical_and(fp32, bf16).sum() / union if union else 1.0)
    return {"images": len(ious), "mean_iou": float(np.mean(ious)), "median_iou": float(np.median(ious)),
            "identical_masks": int(sum(i == 1.0 for i in ious)), "fp32_images_per_s": masks[False][1],
            "bf16_images_per_s": masks[True][1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(Path(__file__).resolve().parents[2] / "shared/data/tiny_coco/val2017"),
                   help="folder of images (default: ../shared/data/tiny_coco/val2017)")
    p.add_argument("--mode", default="both", choices=["both", "pipeline", "baseline", "half_agreement"],
                   help="what to run: both timings, one of them, or the mask IoU of --half against fp32")
    p.add_argument("--max_images", type=int, default=8, help="images per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode with --mode both; medians are reported")
    p.add_argument("--arch", default="vit_small", help="vit_small, vit_base, dinov2_vits14, ... (see distill/vit.py)")
    p.add_argument("--patch_size", type=int, default=None, help="16 or 8 for DINO, 14 for DINOv2 (default: the arch's)")
    p.add_argument("--weights", default="random", help="random (timing only), dino, or a checkpoint path")
    p.add_argument("--resize", type=int, default=640, help="shorter side (default: %(default)s)")
    p.add_argument("--max_size", type=int, default=2048, help="longer-side cap (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="pipeline batch size (default: %(default)s)")
    p.add_argument("--num_workers", type=int, default=None, help="pipeline DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--half", action="store_true", help="pipeline with bf16 autocast")
    p.add_argument("--keep_json", help="pipeline: copy the output masks JSON here (for agreement checks)")
    args = p.parse_args()
    args.patch_size = resolve_patch_size(args.arch, args.patch_size)

    if args.mode == "half_agreement":
        print(json.dumps(half_agreement(args)))
        return
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
