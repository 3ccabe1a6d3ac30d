"""DeepLab-v3 training and inference throughput on random tensors (model cost only, no data loading).

    python benchmarks/bench_segmentation.py                       # ResNet-50 OS8, 128 px crops, CPU-sized
    python benchmarks/bench_segmentation.py --crop 512 --batch 8 --amp --device cuda --iters 20
Prints the median seconds per training iteration, images/s, inference images/s and peak memory.
"""
import argparse
import resource
import statistics
import time

import torch

from segmentation.engine import segmentation_loss
from segmentation.model import BACKBONES, build_deeplab
from utils.distributed import resolve_device


def main():
    parser = argparse.ArgumentParser(description="Benchmark DeepLab-v3 training and inference speed.")
    parser.add_argument("--backbone", default="resnet50", choices=BACKBONES, help="backbone (default resnet50)")
    parser.add_argument("--output_stride", type=int, default=8, help="8 (default), 16 or 32")
    parser.add_argument("--crop", type=int, default=128, help="training crop size in pixels (default 128)")
    parser.add_argument("--batch", type=int, default=2, help="training batch size (default 2)")
    parser.add_argument("--iters", type=int, default=4, help="timed training iterations after one warm-up (default 4)")
    parser.add_argument("--eval_size", type=int, nargs=2, default=[375, 500], metavar=("H", "W"),
                        help="inference image size (default 375 500, a VOC image)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    args = parser.parse_args()
    device = resolve_device(args.device)
    amp = args.amp and device.type == "cuda"
    torch.manual_seed(0)
    model = build_deeplab(21, args.backbone, args.output_stride).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    labels = torch.randint(0, 21, (args.batch, args.crop, args.crop), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.iters + 1):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
        loss = segmentation_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        if i:  # the first iteration warms up allocators and kernels
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    print(f"{args.backbone} OS{args.output_stride} on {device}{' AMP' if amp else ''}: train batch {args.batch} "
          f"x {args.crop}px: {step:.3f} s/iter, {args.batch / step:.2f} img/s")
    model.eval()
    image = torch.randn(1, 3, *args.eval_size, device=device)
    times = []
    with torch.no_grad():
        for i in range(4):
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                model(image)
            sync()
            if i:
                times.append(time.perf_counter() - start)
    print(f"inference {args.eval_size[0]}x{args.eval_size[1]}: {1 / statistics.median(times):.2f} img/s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
