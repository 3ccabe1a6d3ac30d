"""PA predictor throughput: training iterations/s, data loading per sample and inference images/s, with peak memory.

  python benchmarks/bench_train_affinity.py --threads 1          # tiny config on tiny_coco (CPU, ~1 min)
  python benchmarks/bench_train_affinity.py --config configs/affinity/ggn_voc.yaml \
      --set model.backbone_weights=none solver.ims_per_batch=1 --iters 10 --device cuda   # the real model

Reads the images of --train_json at the config's training size (the tiny_coco train2017 images by
default, or synthetic shapes with --synthetic), then times full training steps (forward, GGN's loss,
backward, SGD; AMP on CUDA when the config says so) on batches made beforehand, one sample's data
loading (image decode, masks, PA target), and inference on one image at the test size.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detectron2_train.affinity import AffinityDataset, affinity_loss, build_affinity_model, collate_affinity, pad_images
from detectron2_train.affinity_engine import SCHEMA
from benchmarks.timing import add_timing_args, print_peak_memory, timing_device
from tests.helpers.synthetic_shapes import make_dataset
from utils.config import load_config
from utils.errors import run_cli

TINY_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_coco"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/affinity/tiny_test.yaml", help="PA config (default: tiny_test)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.fine_channels=0")
    p.add_argument("--train_json", default=str(TINY_COCO / "annotations" / "instances_train2017.json"),
                   help="COCO instances to read (default: tiny_coco train2017)")
    p.add_argument("--train_root", default=str(TINY_COCO / "train2017"), help="its image root")
    p.add_argument("--synthetic", type=int, default=0, metavar="SIZE",
                   help="use 16 synthetic shape images of SIZE x SIZE instead of --train_json")
    add_timing_args(p)
    args = p.parse_args()
    device = timing_device(args)
    cfg = load_config(args.config, args.overrides, SCHEMA)
    batch = int(cfg["solver"]["ims_per_batch"])
    sizes = cfg["input"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            json_path = make_dataset(tmp, 16, size=args.synthetic, seed=0)
            root = Path(tmp) / "images"
        else:
            json_path, root = Path(args.train_json), Path(args.train_root)
        dataset = AffinityDataset(json_path, root, min_sizes=sizes["min_size_train"], max_size=sizes["max_size_train"],
                                  flip_prob=sizes["hflip_prob"])
        count = min(len(dataset), batch * 8)
        start = time.perf_counter()
        samples = [dataset[(i, i)] for i in range(count)]
        data_s = (time.perf_counter() - start) / count
        test = AffinityDataset(json_path, root, min_sizes=[sizes["min_size_test"]], max_size=sizes["max_size_test"])
        test_images = [test[i][0] for i in range(min(len(test), 8))]
    torch.manual_seed(0)
    model = build_affinity_model({**cfg["model"], "backbone_weights": "none"}).to(device)
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.001, momentum=0.9)
    use_amp = bool(cfg["solver"]["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    times = []
    for it in range(args.warmup + args.iters):
        images, targets = collate_affinity([samples[(it * batch + k) % len(samples)] for k in range(batch)])
        images, affinity, mask = images.to(device), targets["affinity"].to(device), targets["loss_mask"].to(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=use_amp):
            loss = affinity_loss(model(images), affinity, mask, float(cfg["loss"]["pos_weight"]))
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        if it >= args.warmup:
            times.append(time.perf_counter() - start)
    train_s = statistics.median(times)
    model.eval()
    inference = []
    with torch.no_grad():
        for image in test_images:
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, enabled=use_amp):
                model(pad_images([image]).to(device))
            synchronize(device)
            inference.append(time.perf_counter() - start)
    inf_s = statistics.median(inference[1:] or inference)
    params = sum(q.numel() for q in model.parameters())
    shape = "x".join(map(str, samples[0][0].shape[1:]))
    print(f"device {device}, threads {torch.get_num_threads()}, config {args.config}, {params / 1e6:.2f} M parameters, "
          f"training images like {shape}, batch {batch}, AMP {use_amp}")
    print(f"train: {train_s * 1000:.1f} ms/iter (median of {len(times)}), {batch / train_s:.1f} images/s")
    print(f"data: {data_s * 1000:.1f} ms/sample (decode, masks, PA target; mean of {count})")
    print(f"inference: {inf_s * 1000:.1f} ms/image at test size (median), {1 / inf_s:.1f} images/s")
    print_peak_memory(device)


if __name__ == "__main__":
    run_cli(main)
