"""gen_masks.py with DINOv2: --arch / --patch_size rules, --features, --precision (and the --half
alias) resolved and recorded, and a resume that refuses a change of precision."""
import json

import numpy as np
import pytest
from PIL import Image

import distill.engine as engine_module
import gen_masks
from tests import cli_helpers
from utils.errors import UserError


def parse(*args):
    return gen_masks.build_parser().parse_args([*map(str, args)])


def generate(*args):
    parser = gen_masks.build_parser()
    return engine_module.generate_masks(engine_module.gen_masks_from_args(parser.parse_args([*map(str, args)])))


@pytest.fixture
def three_images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 44), (44, 30), (30, 44)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i + 1}.png")
    return root


def job(root, out, *extra):
    return ["--dataset", "folder", "--dataset_root", root, "--resize", 0, "--pred_json_path", out,
            "--arch", "dinov2_vits14", "--weights", "random", "--num_workers", 0, "--batch_size", 2, *extra]


def test_half_is_an_alias_of_bf16_and_auto_is_the_default():
    assert parse("--pred_json_path", "x.json").precision == "auto"
    assert parse("--pred_json_path", "x.json", "--half").precision == "bf16"
    assert parse("--pred_json_path", "x.json", "--precision", "fp32").precision == "fp32"
    assert parse("--pred_json_path", "x.json").patch_size is None


def test_dinov2_with_a_dino_patch_size_is_refused_before_any_work(three_images, tmp_path):
    out = tmp_path / "masks.json"
    with pytest.raises(UserError, match="--arch dinov2_vits14 has patch size 14, not --patch_size 16"):
        generate(*job(three_images, out, "--patch_size", 16))
    assert not out.exists() and not (tmp_path / "masks.json.parts").exists()


def test_dinov2_run_records_its_resolved_settings_and_resume_refuses_another_precision(three_images, tmp_path,
                                                                                    monkeypatch, tiny_vits14):
    out = tmp_path / "masks.json"
    generate(*job(three_images, out, "--precision", "bf16"))
    settings = json.loads(out.read_text())["info"]["settings"]
    assert (settings["arch"], settings["patch_size"], settings["features"], settings["precision"]) == (
        "dinov2_vits14", 14, "centred", "bf16")

    interrupted = tmp_path / "interrupted.json"
    # after the first batch: the part holds image records (an empty part is replaced)
    monkeypatch.setattr(engine_module, "backbone_features",
                        cli_helpers.interrupt_on_call(engine_module.backbone_features, 2))
    with pytest.raises(KeyboardInterrupt):
        generate(*job(three_images, interrupted, "--half"))
    with pytest.raises(UserError, match="made with precision=bf16, not fp32"):
        generate(*job(three_images, interrupted, "--precision", "fp32", "--resume"))
    with pytest.raises(UserError, match="made with features=centred, not raw"):
        generate(*job(three_images, interrupted, "--half", "--features", "raw", "--resume"))


def test_auto_records_its_choice_and_why_and_a_resume_does_not_compare_the_why(three_images, tmp_path, monkeypatch,
                                                                              tiny_vits14):
    interrupted = tmp_path / "interrupted.json"
    real_features = engine_module.backbone_features
    monkeypatch.setattr(engine_module, "backbone_features", cli_helpers.interrupt_on_call(real_features, 2))
    with pytest.raises(KeyboardInterrupt):
        generate(*job(three_images, interrupted))  # --precision auto: measured (conftest: fp32 faster)
    part, = (tmp_path / "interrupted.json.parts").glob("*.inprogress")
    header, *records = part.read_text().splitlines(keepends=True)
    settings = json.loads(header)["settings"]
    assert settings["precision"] == "fp32"
    assert settings["precision_choice"].startswith("auto: fp32 is faster on this CPU (measured: one forward at "
                                                   "dinov2_vits14/14 1x3x476x476 took 1.000 s in fp32, 2.000 s in bf16")
    # A part made before the reason was recorded (or on another machine, with other times) resumes.
    del settings["precision_choice"]
    part.write_text(json.dumps({**json.loads(header), "settings": settings}) + "\n" + "".join(records))
    monkeypatch.setattr(engine_module, "backbone_features", real_features)
    generate(*job(three_images, interrupted, "--resume"))
    done = json.loads(interrupted.read_text())
    assert len(done["images"]) == 3 and done["info"]["settings"]["precision"] == "fp32"
