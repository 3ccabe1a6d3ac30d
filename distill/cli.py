"""The command-line flags shared by the commands that generate masks (`gen_masks.py`, and any other
mask source run by `distill.generate`), the typed options they become, and the settings they record.

Flags live in named argument groups. Those of `SETTING_GROUPS` change the masks, so they are the
run's *settings*: recorded in every part file and in the output, and a resume or a merge refuses
parts made with other values. A command adds its own flags to these groups (e.g. `gen_masks.py`'s
"backbone" and "method") and they become settings with no list to keep in step. This module does
not import torch, so `--help` is quick.

A command turns its parsed flags into frozen dataclasses once, at the boundary (`utils.cli.options_from`), and
the library takes those: `ImageSetOptions` (the flags of `add_image_arguments`) and `OutputOptions`
(those of `add_output_arguments`, less `--merge`, a mode of the command rather than of the job).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from utils.cli import int_range

SETTING_GROUPS = ("images", "backbone", "method", "encoding")
# Recorded with the settings but not compared by a resume or a merge: how a setting was decided (the
# precision's reason names measured times, which differ from machine to machine for the same choice).
RECORDED_ONLY = ("precision_choice",)


def add_image_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The image-set flags (group "images"), shared by every mask source's command; returns the group, for a
    command's own image-set flags."""
    data = parser.add_argument_group("images")
    data.add_argument("--dataset", choices=["VOCClass", "COCO20k", "folder"],
                      help="image set: VOC (VOCdevkit layout), COCO20k (COCO JSON + file list), or any folder "
                           "of images searched recursively")
    data.add_argument("--dataset_root", help="VOCdevkit folder, COCO image root, or the image folder")
    data.add_argument("--year", default="2012", help="VOC year, e.g. 2007 or 2012 (default: %(default)s)")
    data.add_argument("--set", default="trainval", help="VOC image set name (default: %(default)s)")
    data.add_argument("--voc_split_folder", default="Segmentation", choices=["Segmentation", "Main"],
                      help="VOC ImageSets sub-folder holding the image list (default: %(default)s)")
    data.add_argument("--coco_json", help="COCO20k: the COCO instances JSON the subset is taken from")
    data.add_argument("--file_list", help="COCO20k: text file of image file names (LOST's coco_20k_filenames.txt); "
                                          "the subset GT and its class-agnostic twin are written next to the output")
    data.add_argument("--image_ids", default="auto", type=image_ids_mode,
                      help="folder: image ids from a COCO file by file name (from:GT.json: the same path relative "
                           "to --dataset_root, else the same base name when unique), from integer "
                           "file names (filename; auto: when all are distinct integers) or 1..N (sequential) "
                           "(default: %(default)s)")
    data.add_argument("--skip_images_not_in_gt", action="store_true",
                      help="with --image_ids from:GT.json (gen_masks.py: --gt_json): leave out the images the GT does not "
                           "have (by default they are an error)")
    data.add_argument("--exclude", action="append", metavar="GLOB",
                      help="folder: leave out files whose path relative to --dataset_root, or one of its folders, "
                           "matches GLOB, e.g. --exclude masks --exclude '*_mask.png' (repeatable)")
    data.add_argument("--max_images", type=int_range(0), default=0,
                      help="process only the first N images (0: all)")
    return data


def image_ids_mode(text: str) -> str:
    """argparse type of --image_ids: auto, filename, sequential or from:GT.json (kept as an absolute path, so that
    a resume from another folder records the same setting)."""
    if text in ("auto", "filename", "sequential"):
        return text
    if text.startswith("from:") and len(text) > len("from:"):
        return "from:" + str(Path(text[len("from:"):]).resolve())
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, filename, sequential or from:GT.json")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The output flags (groups "encoding" and "output"), shared by every mask source's command."""
    encoding = parser.add_argument_group("encoding")
    encoding.add_argument("--mask_format", default="rle", choices=["rle", "polygon"],
                          help="mask encoding (default: %(default)s, lossless)")
    out = parser.add_argument_group("output")
    out.add_argument("--pred_json_path", required=True, help="output COCO JSON (images, annotations, categories)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output or part")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping finished images")
    out.add_argument("--shard", default="0/1",
                     help="i/N: process every N-th batch starting at i into its own part (default: %(default)s)")
    out.add_argument("--merge", action="store_true", help="join the finished shard parts of --pred_json_path into it")
    out.add_argument("--vis_dir", help="write an overlay PNG per image (every mask coloured, with its score, box "
                                       "and seed) and an index.html gallery here")


@dataclass(frozen=True)
class ImageSetOptions:
    """The image set of a mask-generation job (the flags of `add_image_arguments`; their --help explains each)."""

    dataset: str | None
    dataset_root: str | None
    year: str = "2012"
    set: str = "trainval"
    voc_split_folder: str = "Segmentation"
    coco_json: str | None = None
    file_list: str | None = None
    image_ids: str = "auto"
    skip_images_not_in_gt: bool = False
    exclude: tuple[str, ...] = ()  # folder: globs left out
    max_images: int = 0  # the first N images only (0: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude or ()))  # argparse gives None or a list


@dataclass(frozen=True)
class OutputOptions:
    """Where and how a mask-generation job writes (the flags of `add_output_arguments` but --merge)."""

    pred_json_path: str
    mask_format: str = "rle"
    overwrite: bool = False
    resume: bool = False
    shard: str = "0/1"  # i/N
    vis_dir: str | None = None


def setting_names(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The flags of the `SETTING_GROUPS` argument groups: what a resume or a merge must agree on."""
    return tuple(action.dest for group in parser._action_groups if group.title in SETTING_GROUPS
                 for action in group._group_actions)


def settings_from(parser: argparse.ArgumentParser, values: Mapping[str, Any]) -> dict:
    """The run's settings, as recorded in every part and in the output: the values (flag dest -> resolved
    value) of the setting flags, in the parser's order."""
    settings = {name: values[name] for name in setting_names(parser)}
    if settings.get("dataset_root"):
        settings["dataset_root"] = str(Path(settings["dataset_root"]).resolve())
    return settings
