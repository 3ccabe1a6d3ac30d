"""pipeline.py without running a stage: the settings it hands each stage's library are those the stage's command
builds from the same flags, everything that can refuse a run does so before the first stage and leaves nothing
behind, and the step records name paths inside OUT relative to it. (tests/test_pipeline.py runs the stages.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gen_masks
import pipeline
from orchestrate import pipeline as pipe
from tests.cli_helpers import error_line, run_main
from utils.errors import UserError


def image_folder(folder: Path, names: list[str], size: tuple[int, int] = (40, 60)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(folder / name)
    return folder


def gt_file(path: Path, names: list[str], size: tuple[int, int] = (40, 60)) -> Path:
    images = [{"id": 100 + n, "file_name": name, "height": size[0], "width": size[1]} for n, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}))
    return path


def settings(tmp_path: Path, *extra: str) -> pipe.PipelineSettings:
    return pipe.settings_from_args(pipeline.build_parser().parse_args(
        ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), *extra]))


def refused(tmp_path: Path, *extra: str) -> str:
    """The error line of pipeline.py with these flags, after checking that it left no output folder."""
    code, _, stderr = run_main(pipeline.main, ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                                               "--tiny", *extra])
    assert code == 2 and not (tmp_path / "out").exists(), stderr
    return error_line(stderr)


# ----------------------------------------------------------------------------- the stages' settings


def comparable(built):
    """Mask-generation settings less what is only recorded (RECORDED_ONLY: the reason of --precision auto's choice,
    which says whether the measurement was made now or read from the cache)."""
    from dataclasses import replace

    from distill.cli import RECORDED_ONLY

    settings = {k: v for k, v in built.job.settings.items() if k not in RECORDED_ONLY}
    return replace(built, backbone=replace(built.backbone, precision_choice=""), job=replace(built.job, settings=settings))


@pytest.mark.parametrize("flags", [["--tiny"], ["--tiny", "--method", "maskcut", "--gt_json", "GT"],
                                   ["--weights", "random", "--device", "cpu"], ["--method", "maskcut"],
                                   ["--tiny", "--arch", "dinov2_vits14", "--backbone", "vit"]])
def test_the_masks_stage_gets_what_gen_masks_builds_from_the_recorded_flags(tmp_path, flags):
    from distill.engine import gen_masks_from_args, gen_masks_settings

    names = ["a.jpg", "sub/b.jpg", "wide.png"]
    image_folder(tmp_path / "images", names)
    flags = [str(gt_file(tmp_path / "gt.json", names)) if f == "GT" else f for f in flags]
    s = pipe.replace(settings(tmp_path, *flags), exclude=("wide.png",))
    folder = tmp_path / "out" / "masks"
    built = gen_masks_settings(pipe.gen_masks_request(s, folder))
    argv = pipe.gen_masks_argv(s) + ["--pred_json_path", str(folder / "masks.json"), "--vis_dir", str(folder / "vis"),
                                     "--resume"]
    assert comparable(built) == comparable(gen_masks_from_args(gen_masks.build_parser().parse_args(argv)))
    assert built.job.images.exclude == ("wide.png",)
    if "--gt_json" in flags:
        assert built.job.settings["image_ids"] == f"from:{(tmp_path / 'gt.json').resolve()}"
        assert built.job.images.skip_images_not_in_gt


@pytest.mark.parametrize("tiny", [True, False])
def test_the_trainers_get_what_their_commands_build_from_the_same_flags(tmp_path, tiny):
    from detectron2_train import train_net
    from detectron2_train.settings import round_settings, train_config
    from segmentation.engine import SCHEMA
    from segmentation.train_plus_crf import parse_args as deeplab_args
    from utils.config import run_config_from_args

    image_folder(tmp_path / "images", ["a.jpg"])
    s = settings(tmp_path, *(["--tiny"] if tiny else []), "--self_training_rounds", "3", "--score_thresh", "0.6")
    images = str((tmp_path / "images").resolve())
    folder = tmp_path / "out" / "maskrcnn"
    train, rounds = pipe.mask_rcnn_requests(s, "labelled.json", folder)
    args = train_net.parse_args(["--config", str(pipe.REPO / pipe.MASK_RCNN_CONFIGS["resnet"][tiny]), "--train_json",
                                 "labelled.json", "--train_root", images, "--output_dir", str(folder),
                                 "--rounds", "3", "--score_thresh", "0.6", "--device", s.device,
                                 *(["--set", *pipe.TINY_MASK_RCNN] if tiny else [])])
    assert train_config(train) == train_net.config_from_args(args)
    assert round_settings(train, rounds) == train_net.round_settings(args)

    semantic = {"label_dir": "labels", "list": "train.txt", "num_classes": 6}
    folder = tmp_path / "out" / "deeplab"
    args = deeplab_args(["--config", str(pipe.REPO / pipe.DEEPLAB_CONFIGS["resnet"][tiny]), "--output_dir", str(folder),
                         "--device", s.device, "--rounds", "1", "--set", f"data.image_dir={images}",
                         "data.label_dir=labels", "data.train_list=train.txt", "data.num_classes=6",
                         "data.val_list=null", "data.val_label_dir=null",
                         *(pipe.TINY_DEEPLAB if tiny else pipe.FULL_DEEPLAB)])
    assert pipe.deeplab_config(s, semantic, folder) == run_config_from_args(args, SCHEMA)


@pytest.mark.parametrize("tiny", [True, False])
def test_the_vit_route_trains_on_the_masks_checkpoint_as_the_trainers_commands_would(tmp_path, tiny):
    from detectron2_train import train_net
    from detectron2_train.engine import SCHEMA as TRAIN_SCHEMA
    from utils.config import load_config
    from detectron2_train.settings import round_settings, train_config
    from segmentation.engine import SCHEMA
    from segmentation.train_plus_crf import parse_args as deeplab_args
    from utils.config import run_config_from_args

    image_folder(tmp_path / "images", ["a.jpg"])
    (tmp_path / "ckpt.pth").write_bytes(b"PK\x03\x04")
    ckpt = str(tmp_path / "ckpt.pth")
    s = settings(tmp_path, *(["--tiny"] if tiny else []), "--arch", "dinov2_vits14", "--weights", ckpt,
                 "--backbone", "vit")
    vit = ["model.vit.arch=dinov2_vits14", f"model.vit.weights={ckpt}"]
    backbone = ["model.backbone=vit"] if tiny else []  # the tiny twins' own backbone is the tiny ResNet
    images = str((tmp_path / "images").resolve())
    out = (tmp_path / "out").resolve()
    folder = tmp_path / "out" / "maskrcnn"
    train, rounds = pipe.mask_rcnn_requests(s, "labelled.json", folder)
    config = ("tiny_vit_dinov2_s14_cpu.yaml" if tiny else "vit_dinov2_s14_cpu.yaml")
    args = train_net.parse_args(["--config", str(pipe.REPO / "configs" / "detectron2" / config), "--train_json",
                                 "labelled.json", "--train_root", images, "--output_dir", str(folder),
                                 "--rounds", "2", "--device", s.device, "--set",
                                 *(pipe.TINY_MASK_RCNN if tiny else []), *backbone, *vit,
                                 f"model.vit.cache_dir={out / 'vit_cache'}", "data.class_agnostic=false"])
    cfg = train_config(train)
    assert cfg == train_net.config_from_args(args)
    # the recipe alone is class-agnostic; the pipeline's detector learns the clusters, which DeepLab then learns
    assert load_config(str(pipe.REPO / "configs" / "detectron2" / config), [], TRAIN_SCHEMA)["data"]["class_agnostic"]
    assert cfg["data"]["class_agnostic"] is False
    assert round_settings(train, rounds) == train_net.round_settings(args)
    assert cfg["model"]["backbone"] == "vit" and cfg["model"]["vit"]["weights"] == ckpt

    semantic = {"label_dir": "labels", "list": "train.txt", "num_classes": 6}
    folder = tmp_path / "out" / "deeplab"
    config = "tiny_deeplab_vit_dinov2_s14_cpu.yml" if tiny else "deeplab_vit_dinov2_s14_cpu.yml"
    args = deeplab_args(["--config", str(pipe.REPO / "configs" / "segmentation" / config), "--output_dir",
                         str(folder), "--device", s.device, "--rounds", "1", "--set", f"data.image_dir={images}",
                         "data.label_dir=labels", "data.train_list=train.txt", "data.num_classes=6",
                         "data.val_list=null", "data.val_label_dir=null", *(pipe.TINY_DEEPLAB if tiny else []),
                         *backbone, *vit])
    built = pipe.deeplab_config(s, semantic, folder)
    assert built == run_config_from_args(args, SCHEMA)
    assert built["model"]["backbone"] == "vit" and built["model"]["vit"]["arch"] == "dinov2_vits14"
    # --tiny without --weights: every stage on the same random ViT
    if tiny:
        s = pipe.replace(s, weights=None)
        assert "model.vit.weights=random" in pipe.mask_rcnn_requests(s, "labelled.json", folder)[0].overrides
        assert "model.vit.weights=random" in pipe.deeplab_overrides(s, semantic)
        assert pipe.gen_masks_request(s, folder).backbone.weights == "random"


def test_arch_and_backbone_are_recorded_so_a_change_is_refused(tmp_path):
    from utils.fingerprint import difference
    from utils.steps import step_fingerprint

    image_folder(tmp_path / "images", ["a.jpg"])

    def fingerprints(*flags: str) -> dict:
        """Each step's own settings, its inputs aside (a changed input reruns it anyway)."""
        return {step.name: step_fingerprint(pipe.replace(step, inputs=()), {})
                for step in pipe.build_steps(settings(tmp_path, *flags))}

    resnet = fingerprints("--tiny")
    assert "--arch" not in pipe.gen_masks_argv(settings(tmp_path, "--tiny"))  # earlier runs' records resume
    other_arch = fingerprints("--tiny", "--arch", "dinov2_vits14")
    assert difference(resnet["masks"], other_arch["masks"]) is not None
    assert difference(resnet["maskrcnn"], other_arch["maskrcnn"]) is None  # the ResNet trainers: no ViT
    vit = fingerprints("--tiny", "--arch", "dinov2_vits14", "--backbone", "vit")
    assert difference(other_arch["masks"], vit["masks"]) is None
    for stage in ("maskrcnn", "deeplab"):
        assert difference(other_arch[stage], vit[stage]) is not None, stage
        assert difference(vit[stage], fingerprints("--tiny", "--backbone", "vit")[stage]) is not None, stage
    # the checkpoint counts by its content in the trained stages too
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"PK\x03\x04 first")
    first = fingerprints("--tiny", "--backbone", "vit", "--weights", str(ckpt))
    ckpt.write_bytes(b"PK\x03\x04 second, longer")
    second = fingerprints("--tiny", "--backbone", "vit", "--weights", str(ckpt))
    for stage in ("masks", "maskrcnn", "deeplab"):
        assert "weights" in difference(first[stage], second[stage]), stage
    # settings made without the parser are checked too
    for field, flag in (("arch", "--arch"), ("backbone", "--backbone")):
        with pytest.raises(UserError, match=f"^{flag} 'vit_huge': choose one of "):
            pipe.check_settings(pipe.replace(settings(tmp_path, "--tiny", "--num_classes", "1"), **{field: "vit_huge"}))
    # the token cache is recorded inside OUT ($OUT/...): a moved OUT resumes
    overrides = pipe.build_steps(settings(tmp_path, "--tiny", "--backbone", "vit"))[2].settings["overrides"]
    assert "model.vit.cache_dir=$OUT/vit_cache" in overrides


# ----------------------------------------------------------------------------- checks before any stage


def test_the_ground_truth_is_matched_to_the_folder_by_file_name_before_any_stage(tmp_path, capsys):
    image_folder(tmp_path / "images", ["a.jpg", "sub/b.jpg", "c.jpg"])
    gt = gt_file(tmp_path / "gt.json", ["sub/b.jpg", "elsewhere/a.jpg", "z.jpg"])  # a.jpg by its unique base name
    pipe.check_settings(settings(tmp_path, "--tiny", "--num_classes", "2", "--gt_json", str(gt)))
    out, err = capsys.readouterr()
    assert f"--gt_json {gt}: 2 of 3 images matched by file name" in out
    assert "not in --gt_json, left out of the run: c.jpg" in err
    # a GT of other images: refused, naming what to pass
    other = gt_file(tmp_path / "other.json", ["x.jpg", "y.jpg"])
    assert refused(tmp_path, "--gt_json", str(other)) == (
        f"error: --gt_json {other}: none of the 3 images of --images {tmp_path / 'images'} is in it (matched by file "
        "name: the same path relative to --images, else the same base name); pass the ground truth of these "
        "images, or leave --gt_json out")


def test_two_folder_images_matching_one_gt_image_are_refused_before_any_stage(tmp_path):
    """The same rule as the masks stage's ids (utils.coco_io.find_by_file_name): refused up front, naming
    pipeline.py's own flag, not after the masks stage started."""
    image_folder(tmp_path / "images", ["a/x.jpg", "b/x.jpg", "c.jpg"])
    gt = gt_file(tmp_path / "gt.json", ["x.jpg", "c.jpg"])  # both x.jpg match it by base name
    assert refused(tmp_path, "--gt_json", str(gt), "--num_classes", "1") == (
        f"error: 'a/x.jpg' and 'b/x.jpg' both match image 'x.jpg' of --gt_json {gt} (by file_name); keep one of "
        "them out of --images")


def test_num_classes_is_checked_against_the_images_before_any_stage(tmp_path):
    image_folder(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg"])
    assert refused(tmp_path, "--num_classes", "4") == (
        "error: --num_classes 4 is more than the 3 images the run takes: K-means needs a mask per cluster; "
        "pass --num_classes 3 or fewer")
    gt = gt_file(tmp_path / "gt.json", ["a.jpg", "b.jpg"])  # the images the GT has are those the run takes
    assert refused(tmp_path, "--num_classes", "3", "--gt_json", str(gt)).startswith(
        "error: --num_classes 3 is more than the 2 images")
    pipe.check_settings(settings(tmp_path, "--num_classes", "3"))  # 3 of 3: accepted


def test_an_output_folder_that_cannot_be_written_is_one_error_line(tmp_path):
    image_folder(tmp_path / "images", ["a.jpg"])
    (tmp_path / "file").write_text("x")
    for out, expected in [(tmp_path / "file", "exists and is not a folder"),
                          (tmp_path / "file" / "out", f"cannot write --out {tmp_path / 'file' / 'out'}: "),
                          (Path("/proc/maskdistill_out"), "cannot write --out /proc/maskdistill_out: ")]:
        code, _, stderr = run_main(pipeline.main, ["--images", str(tmp_path / "images"), "--out", str(out), "--tiny",
                                                   "--num_classes", "1"])
        assert code == 2 and expected in error_line(stderr), stderr


def test_weights_are_checked_before_any_stage(tmp_path):
    image_folder(tmp_path / "images", ["a.jpg"])
    assert refused(tmp_path, "--num_classes", "1", "--weights", str(tmp_path / "missing.pth")) == (
        f"error: --weights {tmp_path / 'missing.pth'}: no such file; use 'dino', 'random' or a checkpoint path")
    (tmp_path / "notes.txt").write_text("not weights")
    assert refused(tmp_path, "--num_classes", "1", "--weights", str(tmp_path / "notes.txt")) == (
        f"error: --weights {tmp_path / 'notes.txt'}: not a PyTorch checkpoint (torch.save file)")
    import torch

    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    pipe.check_weights(str(tmp_path / "w.pth"))


def test_another_method_into_the_same_out_is_refused_unless_overwrite(tmp_path):
    image_folder(tmp_path / "images", ["a.jpg"])
    earlier = settings(tmp_path, "--tiny", "--num_classes", "1")
    marker = tmp_path / "out" / "masks" / "step.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": {"settings": {"gen_masks": pipe.gen_masks_argv(earlier)}}}))
    code, _, stderr = run_main(pipeline.main, ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                                               "--tiny", "--num_classes", "1", "--method", "maskcut"])
    assert code == 2 and error_line(stderr) == (
        f"error: --out {tmp_path / 'out'} holds the results of --method maskdistill; --method maskcut would replace "
        "them: pass another --out to keep both, or --overwrite to replace them")
    assert json.loads(marker.read_text())["fingerprint"]  # untouched
    pipe.check_settings(pipe.replace(earlier, method="maskcut", overwrite=True))
    pipe.check_settings(earlier)  # the same method resumes


def test_an_image_too_thin_for_the_detectors_is_left_out_and_named(tmp_path, capsys):
    image_folder(tmp_path / "images", ["a.jpg", "b.jpg"])
    image_folder(tmp_path / "images", ["wide.png"], size=(20, 10000))
    image_folder(tmp_path / "images", ["tall.png"], size=(401, 20))
    image_folder(tmp_path / "images", ["long_but_fine.png"], size=(20, 400))  # exactly MAX_ASPECT_RATIO
    checked = pipe.check_settings(settings(tmp_path, "--tiny", "--num_classes", "1"))
    assert checked.exclude == ("tall.png", "wide.png")
    err = capsys.readouterr().err
    assert "warning: skipping wide.png: 10000x20 (w x h) is more than 20 times longer than wide" in err
    assert "--exclude" in pipe.gen_masks_argv(checked) and "long_but_fine.png" not in pipe.gen_masks_argv(checked)


# ----------------------------------------------------------------------------- paths in the step records


def test_step_results_name_paths_inside_out_relative_to_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    s = pipe.PipelineSettings(images=str(tmp_path / "images"), out=str(out))
    seen = {}

    def stage(settings, folder, results):
        seen.update(results)
        return {"labelled": str(folder / "labelled.json"), "images": str(tmp_path / "images"), "n": 3,
                "rounds": [{"checkpoint": str(out / "maskrcnn" / "model.pth")}], "matching": "hungarian"}

    (out / "cluster").mkdir(parents=True)
    (out / "cluster" / "labelled.json").write_text("{}")
    (out / "maskrcnn").mkdir()
    (out / "maskrcnn" / "model.pth").write_bytes(b"")
    result = pipe.in_out(stage, s)(out / "cluster", {"masks": {"masks": "$OUT/masks/masks.json"}})
    assert result == {"labelled": "$OUT/cluster/labelled.json", "images": str(tmp_path / "images"), "n": 3,
                      "rounds": [{"checkpoint": "$OUT/maskrcnn/model.pth"}], "matching": "hungarian"}
    assert seen == {"masks": {"masks": str(out / "masks" / "masks.json")}}
    # the same record read by a copy of OUT names the copy's files
    assert pipe.resolved(result, tmp_path / "copy")["labelled"] == str(tmp_path / "copy" / "cluster" / "labelled.json")
    # run from inside OUT (--out .): words and sentences stay as they are, paths of OUT become $OUT/...
    monkeypatch.chdir(out)
    assert pipe.portable({"p": "cluster/labelled.json", "q": "../images", "w": "hungarian",
                          "against": "its own pseudo-labels (round2/pseudo_labels.json)"}, Path(".")) == {
        "p": "$OUT/cluster/labelled.json", "q": "../images", "w": "hungarian",
        "against": "its own pseudo-labels (round2/pseudo_labels.json)"}


def test_a_weights_file_or_gt_changed_at_the_same_path_reruns_the_masks(tmp_path):
    from utils.fingerprint import difference
    from utils.steps import step_fingerprint

    image_folder(tmp_path / "images", ["a.jpg"])
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 first")
    gt = gt_file(tmp_path / "gt.json", ["a.jpg"])
    s = settings(tmp_path, "--tiny", "--weights", str(tmp_path / "w.pth"), "--gt_json", str(gt))
    first = step_fingerprint(pipe.build_steps(s)[0], {})
    assert difference(first, step_fingerprint(pipe.build_steps(s)[0], {})) is None
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 second, longer")
    assert "weights" in difference(first, step_fingerprint(pipe.build_steps(s)[0], {}))
    first = step_fingerprint(pipe.build_steps(s)[0], {})
    gt_file(gt, ["a.jpg", "b.jpg"])
    assert "gt_json" in difference(first, step_fingerprint(pipe.build_steps(s)[0], {}))


def test_a_checkpoint_file_puts_every_stage_on_it_unless_the_backbone_is_named(tmp_path):
    """--backbone auto (the default): `--arch dinov2_vits14 --weights CKPT` alone trains the detector and DeepLab
    on that checkpoint (the ViT recipes); the official or random weights keep the ResNet recipes."""
    ckpt = str(tmp_path / "ckpt.pth")
    assert settings(tmp_path, "--arch", "dinov2_vits14", "--weights", ckpt).backbone == "vit"
    assert settings(tmp_path, "--arch", "dinov2_vits14", "--weights", ckpt, "--backbone", "resnet").backbone == "resnet"
    for weights in ([], ["--weights", "dino"], ["--weights", "random"], ["--tiny"]):
        assert settings(tmp_path, *weights).backbone == "resnet", weights
    assert settings(tmp_path, "--backbone", "vit").backbone == "vit"
    s = settings(tmp_path, "--arch", "dinov2_vits14", "--weights", ckpt)
    train, _ = pipe.mask_rcnn_requests(s, "labelled.json", tmp_path / "out" / "maskrcnn")
    assert train.config.endswith("vit_dinov2_s14_cpu.yaml") and f"model.vit.weights={ckpt}" in train.overrides
