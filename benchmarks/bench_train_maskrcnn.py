"""Mask R-CNN throughput: training iterations/s and inference images/s, with peak memory.

  python benchmarks/bench_train_maskrcnn.py                       # tiny config, 64 px synthetic images (CPU, ~1 min)
  python benchmarks/bench_train_maskrcnn.py --config configs/detectron2/base_mask_rcnn.yaml \
      --image_size 800 --iters 20 --set solver.ims_per_batch=2     # the real R50-FPN model (GPU)
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detectron2_train.data import CocoInstances, collate_lists
from detectron2_train.engine import SCHEMA
from detectron2_train.modeling import build_model, set_image_sizes
from benchmarks.timing import add_timing_args, print_peak_memory, timing_device
from tests.helpers.synthetic_shapes import make_dataset
from utils.config import load_config
from utils.errors import run_cli


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/detectron2/tiny_test.yaml", help="model config (default: tiny_test)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.mask_head=transfer")
    p.add_argument("--image_size", type=int, default=64, help="side of the square synthetic images (default 64)")
    p.add_argument("--num_images", type=int, default=16, help="synthetic images (default 16)")
    add_timing_args(p)
    args = p.parse_args()
    device = timing_device(args)
    cfg = load_config(args.config, args.overrides, SCHEMA)
    size = args.image_size
    cfg["input"].update(min_size_train=[size], max_size_train=size, min_size_test=size, max_size_test=size)
    batch = int(cfg["solver"]["ims_per_batch"])
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(tmp, args.num_images, size=size, seed=0)
        dataset = CocoInstances(data, Path(tmp) / "images")
        samples = [dataset[i] for i in range(len(dataset))]
    torch.manual_seed(0)
    model = build_model(cfg, len(dataset.categories)).to(device)
    set_image_sizes(model, cfg, training=True)
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.001, momentum=0.9)
    use_amp = bool(cfg["solver"]["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.train()
    times = []
    for it in range(args.warmup + args.iters):
        images, targets = collate_lists([samples[(it * batch + k) % len(samples)] for k in range(batch)])
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=use_amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - start)
    train_s = statistics.median(times)
    model.eval()
    set_image_sizes(model, cfg, training=False)
    inf_times = []
    with torch.no_grad():
        for i, (image, _) in enumerate(samples):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, enabled=use_amp):
                model([image.to(device)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            inf_times.append(time.perf_counter() - start)
    inf_s = statistics.median(inf_times[1:] or inf_times)
    params = sum(q.numel() for q in model.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, config {args.config}, mask_head {cfg['model']['mask_head']}, "
          f"{params / 1e6:.2f} M parameters, images {size}x{size}, batch {batch}")
    print(f"train: {train_s * 1000:.1f} ms/iter (median of {len(times)}), {batch / train_s:.1f} images/s")
    print(f"inference: {inf_s * 1000:.1f} ms/image (median), {1 / inf_s:.1f} images/s")
    print_peak_memory(device)


if __name__ == "__main__":
    run_cli(main)
