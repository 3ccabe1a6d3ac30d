"""The mask-generation commands' flags become frozen settings once, at the boundary (`*_from_args`): the parsed
Namespace is left as it is, the settings are resolved and typed, and the recorded settings keep their exact keys,
order and values (the header of every part file: a resume compares them)."""
import copy
import dataclasses
import hashlib

import pytest

import gen_masks
import gen_pa_masks
from distill.cli import ImageSetOptions, OutputOptions, setting_names
from distill.engine import BackboneSettings, SpeedSettings, gen_masks_from_args
from distill.generate import MergeParts
from distill.grouping import GroupingOptions
from distill.methods import MethodSettings
from orchestrate.pa_source import gen_pa_masks_from_args
from utils.errors import UserError


def built_twice(build, parser, argv):
    """`build(parser, args)` twice on one parsed Namespace: (the result, after checking that both calls gave equal
    results and left every value of the Namespace as it was)."""
    args = parser.parse_args([*map(str, argv)])
    before = copy.deepcopy(vars(args))
    first = build(parser, args)
    assert build(parser, args) == first
    assert vars(args) == before
    return first


def gen_masks_command(parser, args):
    return gen_masks_from_args(args)


def test_gen_masks_settings_are_resolved_without_touching_the_namespace(tmp_path):
    out = tmp_path / "masks.json"
    settings = built_twice(gen_masks_command, gen_masks.build_parser(), [
        "--dataset", "folder", "--dataset_root", tmp_path, "--method", "maskcut", "--weights", "random",
        "--precision", "fp32", "--exclude", "a*", "--max_images", 3, "--batch_size", 2, "--device", "cpu",
        "--pred_json_path", out, "--vis_dir", tmp_path / "vis"])
    assert settings.backbone == BackboneSettings("vit_small", 16, "random", "raw", "fp32", "--precision fp32")
    assert settings.method == MethodSettings("maskcut", {"tau": 0.15, "foreground": "eigenvector", "num_objects": 3,
                                                        "mask_score": "official"}, 0, 480, 2048)
    assert settings.speed == SpeedSettings(batch_size=2, num_workers=None, post_workers=None)
    assert settings.job.images == ImageSetOptions("folder", str(tmp_path), exclude=("a*",), max_images=3)
    assert settings.job.output == OutputOptions(str(out), vis_dir=str(tmp_path / "vis"))
    assert settings.job.device == "cpu"
    # Every setting flag, in the parser's order, with the resolved values (None: another method's flag).
    assert list(settings.job.settings.items()) == [
        ("dataset", "folder"), ("dataset_root", str(tmp_path.resolve())), ("year", "2012"), ("set", "trainval"),
        ("voc_split_folder", "Segmentation"), ("coco_json", None), ("file_list", None), ("image_ids", "auto"),
        ("skip_images_not_in_gt", False), ("exclude", ["a*"]), ("max_images", 3),
        ("arch", "vit_small"), ("patch_size", 16), ("weights", "random"), ("features", "raw"), ("precision", "fp32"),
        ("method", "maskcut"), ("heads", None), ("topk", None), ("k_patches", None), ("tau", 0.15),
        ("num_objects", 3), ("foreground", "eigenvector"), ("mask_score", "official"), ("resize", 0), ("fixed_size", 480), ("max_size", 2048),
        ("mask_format", "rle"), ("precision_choice", "--precision fp32")]
    # what gen_masks.py's setting groups hold (and the recorded precision choice), so that a flag added to one of them is recorded
    assert tuple(settings.job.settings) == (*dict.fromkeys(setting_names(gen_masks.build_parser())), "precision_choice")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.job.output.shard = "1/2"


def test_gen_masks_merge_is_a_mode_that_checks_nothing_else(tmp_path):
    out = tmp_path / "masks.json"
    # --tau does not apply to lost, but a merge only joins parts: their settings were checked when they were made.
    command = built_twice(gen_masks_command, gen_masks.build_parser(),
                          ["--merge", "--method", "lost", "--tau", 0.3, "--pred_json_path", out, "--overwrite"])
    assert command == MergeParts(OutputOptions(str(out), overwrite=True))
    with pytest.raises(UserError, match="--tau applies to --method tokencut or maskcut, not lost"):
        gen_masks_from_args(gen_masks.build_parser().parse_args([
            "--dataset", "folder", "--dataset_root", str(tmp_path), "--method", "lost", "--tau", "0.3",
            "--pred_json_path", str(out)]))


def test_gen_pa_masks_settings_record_the_source_file_digest_without_touching_the_namespace(tmp_path):
    gt = tmp_path / "gt.json"
    gt.write_text('{"images": [], "annotations": [], "categories": []}')
    settings = built_twice(gen_pa_masks_from_args, gen_pa_masks.build_parser(), [
        "--dataset", "folder", "--dataset_root", tmp_path, "--affinity", "oracle", "--gt_json", gt, "--topk", 5,
        "--min_area", 4, "--num_workers", 0, "--pred_json_path", tmp_path / "pa.json"])
    assert settings.grouping == GroupingOptions(topk=5, min_area=4)
    assert (settings.affinity, settings.gt_json, settings.num_workers) == ("oracle", str(gt), 0)
    assert settings.job.images == ImageSetOptions("folder", str(tmp_path))
    assert list(settings.job.settings.items()) == [
        ("method", "ggn"), ("dataset", "folder"), ("dataset_root", str(tmp_path.resolve())), ("year", "2012"),
        ("set", "trainval"), ("voc_split_folder", "Segmentation"), ("coco_json", None), ("file_list", None),
        ("image_ids", "auto"), ("skip_images_not_in_gt", False), ("exclude", None), ("max_images", 0),
        ("affinity", "oracle"), ("gt_json", str(gt.resolve())), ("topk", 5), ("globalization", 0.5),
        ("peak_radius", 10), ("nms_iou", 0.2), ("border_ratio", 0.9), ("min_area", 4), ("mask_format", "rle"),
        ("affinity_sha256", hashlib.sha256(gt.read_bytes()).hexdigest())]
