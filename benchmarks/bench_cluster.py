"""Benchmark the clustering stage (distill/cluster.py): CLS-feature extraction of box crops (distill/crop_features.py, crops/s)
and K-means (s).

    python benchmarks/bench_cluster.py                       # tiny_coco val2017 GT boxes, random ViT-S/16, CPU
    python benchmarks/bench_cluster.py --device cuda --patch_size 8 --max_masks 400 --half
    python benchmarks/bench_cluster.py --skip_features --kmeans sklearn   # K-means only (faiss: --kmeans faiss)

Prints throughput and peak memory (RSS; CUDA max allocated on GPU).
"""
import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill import cluster, crop_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"),
                   help="tiny_coco folder (val2017/ and annotations/)")
    p.add_argument("--max_masks", type=int, default=40, help="GT boxes used as masks (default: %(default)s)")
    p.add_argument("--max_side", type=int, default=160, help="boxes are shrunk to at most this side, to bound CPU time (0: no limit)")
    p.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base"], help="ViT size")
    p.add_argument("--patch_size", type=int, default=16, choices=[8, 16], help="ViT patch size")
    p.add_argument("--batch_size", type=int, default=32, help="crops per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--half", action="store_true", help="bf16 autocast")
    p.add_argument("--kmeans_points", type=int, default=20000, help="random 384-d points for the K-means timing")
    p.add_argument("--kmeans_k", type=int, default=80, help="clusters for the K-means timing")
    p.add_argument("--kmeans", default="auto", choices=["auto", "sklearn", "faiss"],
                   help="K-means backend (auto: faiss when installed)")
    p.add_argument("--skip_features", action="store_true", help="time K-means only (384-d points)")
    args = p.parse_args()

    from utils.vit import build_vit
    from utils.distributed import resolve_device

    if args.skip_features:
        time_kmeans(args, 384)
        return
    data = Path(args.data)
    gt = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    anns = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        if args.max_side:
            w, h = min(w, args.max_side), min(h, args.max_side)
        anns.append(dict(a, bbox=[x, y, w, h], score=1.0))
        if len(anns) == args.max_masks:
            break
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "masks.json"
        path.write_text(json.dumps({"images": gt["images"], "annotations": anns, "categories": gt["categories"]}))
        mask_set = crop_features.load_mask_set("bench", path, data / "val2017")
        device = resolve_device(args.device)
        torch.manual_seed(0)
        model = build_vit(args.arch, args.patch_size, "random").to(device)

        def extract() -> np.ndarray:
            return crop_features.extract_features(mask_set, model, device, args.patch_size, args.batch_size, 0,
                                                  args.half, progress=False)

        extract()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        feats = extract()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    print(f"features: {len(anns)} crops in {seconds:.2f} s = {len(anns) / seconds:.1f} crops/s "
          f"({args.arch}/{args.patch_size}, {device}, batch {args.batch_size}, crop side <= {args.max_side or 'any'})")

    time_kmeans(args, feats.shape[1])


def time_kmeans(args: argparse.Namespace, dims: int) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(args.kmeans_points, dims)).astype(np.float32)
    start = time.perf_counter()
    white = cluster.whiten_normalise(points)
    cluster.run_kmeans(white, white, args.kmeans_k, seed=0, backend=args.kmeans)
    backend = ("faiss" if cluster.faiss_available() else "sklearn") if args.kmeans == "auto" else args.kmeans
    print(f"kmeans: {args.kmeans_points} points x {dims} dims, K={args.kmeans_k} ({backend}): "
          f"{time.perf_counter() - start:.2f} s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if torch.cuda.is_available():
        print(f"peak CUDA allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
