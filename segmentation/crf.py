"""Dense CRF refinement (pydensecrf2) with MaskDistill's defaults, for softmax maps or label PNGs.

Library: `dense_crf(image, probs)` refines a (C, H, W) softmax; `refine_labels(image, label)` refines a
label map from the labels alone (unary from labels with a ground-truth probability); `PairwiseCRF`
builds an image's pairwise terms once for several unaries (MaskCut's masks of one image).
Command: refine every mask PNG of a folder with a pool of CPU workers:

    python segmentation/crf.py --image_dir IMAGES --mask_dir MASKS --out_dir OUT

Masks are binary (0/255 -> written back as 0/255) or class-index/palette PNGs (255 = ignore), named
like their images (`<name>.png` for `<name>.jpg`).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from utils.cli import check_outputs, float_range, int_range
from utils.crf import CRFParams, refine_labels
from utils.errors import UserError, run_cli
from utils.images import ImageReadError, load_rgb
from utils.label_png import read_label_png, write_label_png
from utils.workers import default_workers, run_pool


def read_mask(path: Path, mask_type: str = "auto") -> tuple[np.ndarray, bool]:
    """(class map, is_binary). Binary masks (only 0 and 255, or 1-bit) become 0/1 class maps."""
    label = read_label_png(path)
    if mask_type == "palette":
        return label, False
    values = np.unique(label)
    binary = mask_type == "binary" or (mask_type == "auto" and set(values.tolist()) <= {0, 255}
                                       and _png_mode(path) != "P")
    if binary:
        if mask_type == "binary" and not set(values.tolist()) <= {0, 255}:
            raise UserError(f"mask {path} is not binary: it holds values {values[:5].tolist()}")
        return (label > 0).astype(np.uint8), True
    return label, False


def _png_mode(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        return img.mode


def _refine_file(job: tuple) -> str:
    """Worker: refine one mask file and write the result atomically. Returns the mask's relative name."""
    image_path, mask_path, out_path, mask_type, gt_prob, fill_ignore, params = job
    try:
        image = np.array(load_rgb(image_path))
    except ImageReadError as exc:
        raise UserError(f"cannot read image {image_path}: {exc}") from None
    label, binary = read_mask(Path(mask_path), mask_type)
    if label.shape != image.shape[:2]:
        raise UserError(f"mask {mask_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
                        f"is {image.shape[1]}x{image.shape[0]}")
    refined = refine_labels(image, label, CRFParams(**params), gt_prob, fill_ignore)
    if binary:
        refined = (refined > 0).astype(np.uint8) * 255
        from PIL import Image

        from utils.coco_io import atomic_path

        with atomic_path(out_path) as tmp:
            Image.fromarray(refined, mode="L").save(tmp, format="PNG")
    else:
        write_label_png(out_path, refined)
    return str(mask_path)


def refine_folder(image_dir: str | os.PathLike, mask_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  workers: int | None = None, mask_type: str = "auto", gt_prob: float = 0.8,
                  fill_ignore: bool = False, overwrite: bool = False, params: CRFParams = CRFParams()) -> dict:
    """Refine every `*.png` under `mask_dir` (recursively) into `out_dir`; finished files are skipped."""
    from segmentation.data import check_pair_sizes, find_image  # torch: not at import, so that --help stays quick

    image_dir, mask_dir, out_dir = Path(image_dir), Path(mask_dir), Path(out_dir)
    for folder, what in ((image_dir, "image"), (mask_dir, "mask")):
        if not folder.is_dir():
            raise UserError(f"{what} folder not found: {folder}")
    if out_dir.resolve() == mask_dir.resolve():
        raise UserError("--out_dir must differ from --mask_dir (the masks would be overwritten)")
    if not 0.0 < gt_prob < 1.0:
        raise UserError(f"--gt_prob must lie strictly between 0 and 1, not {gt_prob}")
    masks = sorted(p for p in mask_dir.rglob("*.png") if not p.name.startswith("."))
    if not masks:
        raise UserError(f"no .png masks in {mask_dir}")
    jobs, skipped = [], 0
    for mask in masks:
        name = mask.relative_to(mask_dir).with_suffix("").as_posix()
        out_path = out_dir / f"{name}.png"
        if out_path.exists() and not overwrite:
            skipped += 1
            continue
        image = find_image(image_dir, name)
        check_pair_sizes(image, mask, "mask")  # from the headers: bad pairs stop the job before any output
        jobs.append((str(image), str(mask), str(out_path), mask_type, gt_prob, fill_ignore, asdict(params)))
    run_pool(_refine_file, jobs, workers, desc="crf")
    return {"masks": len(masks), "refined": len(jobs), "skipped": skipped}



POSITIVE = float_range(0, min_inclusive=False)


def parse_args(argv=None) -> argparse.Namespace:
    defaults = CRFParams()
    parser = argparse.ArgumentParser(
        description="Refine label PNGs with a dense CRF using only the labels and the images (no network). "
                    "Binary masks (0/255) are written back as 0/255; palette/class-index masks keep their ids.")
    parser.add_argument("--image_dir", required=True, help="folder of the images (matched by file name)")
    parser.add_argument("--mask_dir", required=True, help="folder of mask PNGs named like their images (searched recursively)")
    parser.add_argument("--out_dir", required=True, help="folder for the refined PNGs (same relative names)")
    parser.add_argument("--workers", type=int_range(1), default=None,
                        help=f"CPU worker processes (default: available cores, at most 16; here {default_workers()})")
    parser.add_argument("--mask_type", choices=("auto", "binary", "palette"), default="auto",
                        help="auto (default): a non-palette PNG holding only 0 and 255 is binary (255 = object); "
                             "otherwise 255 means ignore")
    parser.add_argument("--gt_prob", type=float_range(0, 1, min_inclusive=False, max_inclusive=False), default=0.8,
                        help="confidence given to the input labels in the unary term, in (0, 1) (default 0.8)")
    parser.add_argument("--fill_ignore", action="store_true",
                        help="let the CRF label pixels marked 255 (ignore) too; by default they stay 255")
    parser.add_argument("--iterations", type=int_range(1), default=defaults.iterations, help="mean-field iterations (default 10)")
    parser.add_argument("--gauss_sxy", type=POSITIVE, default=defaults.gauss_sxy, help="Gaussian kernel spatial std (default 1)")
    parser.add_argument("--gauss_compat", type=float_range(0), default=defaults.gauss_compat, help="Gaussian kernel weight (default 3)")
    parser.add_argument("--bilateral_sxy", type=POSITIVE, default=defaults.bilateral_sxy, help="bilateral spatial std (default 67)")
    parser.add_argument("--bilateral_srgb", type=POSITIVE, default=defaults.bilateral_srgb, help="bilateral colour std (default 3)")
    parser.add_argument("--bilateral_compat", type=float_range(0), default=defaults.bilateral_compat, help="bilateral kernel weight (default 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo masks already refined in OUT_DIR (by default they are kept, so a job resumes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_outputs(folders=[args.out_dir])
    params = CRFParams(args.iterations, args.gauss_sxy, args.gauss_compat, args.bilateral_sxy,
                       args.bilateral_srgb, args.bilateral_compat)
    stats = refine_folder(args.image_dir, args.mask_dir, args.out_dir, args.workers, args.mask_type,
                          args.gt_prob, args.fill_ignore, args.overwrite, params)
    print(f"{stats['masks']} masks: {stats['refined']} refined, {stats['skipped']} already done; output in {args.out_dir}")
    return 0


def cli() -> None:
    """The `maskdistill-seg-crf` console script: `main` with one-line errors and exit codes."""
    run_cli(main)


if __name__ == "__main__":
    cli()
