"""pipeline.py end to end on tiny_coco with the tiny configs (the README's quick start), its rerun, and a
changed setting that reruns from the step it affects. One module-scoped run serves every test."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline
from orchestrate.pipeline import run_pipeline, settings_from_args
from tests.cli_helpers import documented_argv, error_line, run_main
from utils.steps import Step

REPO = Path(__file__).resolve().parents[1]
TINY_COCO = REPO.parent / "shared" / "data" / "tiny_coco"
STAGES = ["masks", "cluster", "maskrcnn", "semantic", "deeplab", "eval"]
# The README's quick start, word for word (tests/test_docs_commands.py checks that the README still says it).
README_QUICK_START = ("python pipeline.py --images ../shared/data/tiny_coco/val2017 --out OUT "
                      "--gt_json ../shared/data/tiny_coco/annotations/instances_val2017.json --tiny")


def quick_start_argv(out: Path) -> list[str]:
    return documented_argv(README_QUICK_START, {"OUT": str(out)})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    if not TINY_COCO.exists():
        pytest.skip(f"real test data not present: {TINY_COCO}")
    out = tmp_path_factory.mktemp("pipeline") / "out"
    assert pipeline.main(quick_start_argv(out)) == 0
    return out


@pytest.mark.slow
def test_quick_start_writes_the_report_with_its_metrics(first_run):
    for stage in STAGES:
        assert json.loads((first_run / stage / "step.json").read_text())["done"] is True
    rows = json.loads((first_run / "eval" / "metrics.json").read_text())
    metrics = {row["metric"]: row for row in rows}
    expected = ["maskdistill masks mask AP", "maskdistill masks box AP", "maskdistill masks CorLoc",
                "clustering ACC", "clustering NMI", "Mask R-CNN round 2 mask AP",
                "DeepLab mIoU (K-means on its pixel embeddings, Hungarian-matched)"]
    assert all(name in metrics for name in expected), sorted(metrics)
    assert metrics["maskdistill masks mask AP"]["against"] == (
        "instances_val2017.json (50 images, 382 objects, class-agnostic)")
    assert metrics["maskdistill masks CorLoc"]["value"] == json.loads(
        (first_run / "eval" / "corloc.json").read_text())["CorLoc"]
    # the GT-free agreement of the last round with what it trained on
    own = [row for row in rows if "its own training pseudo-labels" in row["against"]]
    assert own and own[0]["against"].startswith("its own training pseudo-labels (round2/pseudo_labels.json")
    page = (first_run / "report.html").read_text()
    assert "<a href='masks/vis/index.html'>masks gallery</a>" in page
    for row in rows:
        assert row["against"].replace("<", "&lt;").replace(">", "&gt;") in page
    assert all(f"<td>{stage}</td><td>ran (new)</td>" in page for stage in STAGES)
    # the stages' outputs where the steps say
    assert (first_run / "masks" / "masks.json").is_file() and (first_run / "cluster" / "labelled.json").is_file()
    assert (first_run / "maskrcnn" / "round2" / "train_results.json").is_file()
    listed = (first_run / "semantic" / "train.txt").read_text().split()
    assert listed and all((first_run / "semantic" / "labels" / f"{name}.png").is_file() for name in listed)
    assert (first_run / "deeplab" / "round1" / "model_final.pth").is_file()


@pytest.mark.slow
def test_rerun_skips_every_finished_step(first_run):
    args = pipeline.build_parser().parse_args(quick_start_argv(first_run))
    records = run_pipeline(settings_from_args(args))
    assert [(r.name, r.status) for r in records] == [(stage, "skipped") for stage in STAGES]
    assert "skipped (done before)" in (first_run / "report.html").read_text()


@pytest.mark.slow
def test_changed_setting_reruns_from_the_affected_step(first_run):
    args = pipeline.build_parser().parse_args(quick_start_argv(first_run) + ["--crf_rounds", "0", "--overwrite"])
    code, _, stderr = run_main(pipeline.main, quick_start_argv(first_run) + ["--crf_rounds", "0"])
    assert code == 2 and error_line(stderr) == (
        f"error: step deeplab in {first_run / 'deeplab'}: it was made with settings.crf_rounds=1, not 0; use the "
        "same settings, or --overwrite to run it again")
    assert (first_run / "deeplab" / "round1").exists()  # refused: nothing deleted
    records = run_pipeline(settings_from_args(args))
    assert [(r.name, r.status) for r in records] == [
        ("masks", "skipped"), ("cluster", "skipped"), ("maskrcnn", "skipped"), ("semantic", "skipped"),
        ("deeplab", "ran"), ("eval", "ran")]
    assert records[4].reason == "it was made with settings.crf_rounds=1, not 0"
    assert not (first_run / "deeplab" / "round1").exists()  # the old rounds are gone, not mixed in


def test_bad_input_stops_before_any_file(tmp_path):
    code, _, stderr = run_main(pipeline.main, ["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2 and error_line(stderr) == f"error: --images {tmp_path / 'missing'}: not a folder"
    assert not (tmp_path / "out").exists()


def fake_stages(calls: list[str]):
    """Two cheap stages in place of the real ones: the masks stage's settings as build_steps makes them."""
    from orchestrate.pipeline import build_steps

    def steps(s):
        real = build_steps(s)[0]
        return [Step("masks", real.settings, lambda folder, results: calls.append("masks") or {}),
                Step("eval", {}, lambda folder, results: calls.append("eval") or {"metrics": []}, inputs=("masks",))]

    return steps


def test_weights_changed_in_place_are_refused_then_rerun_with_overwrite(tmp_path, monkeypatch):
    """--weights counts by its content: the same path with other bytes is a changed setting; pipeline.py names
    its own --overwrite, and with it reruns the masks stage and what reads it."""
    import torch
    from PIL import Image

    from orchestrate import pipeline as orchestration

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24)).save(images / "a.jpg")  # read for its size only: the stages are fakes
    weights = tmp_path / "dino.pth"
    torch.save({"w": torch.zeros(2)}, weights)
    calls: list[str] = []
    monkeypatch.setattr(orchestration, "build_steps", fake_stages(calls))
    argv = ["--images", str(images), "--out", str(tmp_path / "out"), "--weights", str(weights), "--num_classes", "1"]
    assert pipeline.main(argv) == 0 and calls == ["masks", "eval"]
    assert pipeline.main(argv) == 0 and calls == ["masks", "eval"]  # skipped: same settings
    torch.save({"w": torch.ones(2)}, weights)  # the same path, other bytes
    code, _, stderr = run_main(pipeline.main, argv)
    assert code == 2 and error_line(stderr).startswith(
        f"error: step masks in {tmp_path / 'out' / 'masks'}: it was made with settings.weights={weights} (sha256 ")
    assert error_line(stderr).endswith("; use the same settings, or --overwrite to run it again")
    assert calls == ["masks", "eval"]
    assert pipeline.main([*argv, "--overwrite"]) == 0 and calls == ["masks", "eval"] * 2


# ----------------------------------------------------------------------------- a user's folder, killed and copied

USER_IMAGES = 6  # real photos of tiny_coco val2017; the folder also holds an unreadable and a 10000x20 image
GT_ONLY_IMAGES = 2  # images of the user's GT that are not in the folder


def users_folder(root: Path) -> tuple[Path, Path]:
    """A user's folder and COCO GT: real photos, `broken.jpg` (not an image, not in the GT), `wide.jpg` (10000x20),
    and GT ids 1..N in the reverse order of the file names (so no id is the number in its file name)."""
    import shutil

    import numpy as np
    from PIL import Image

    gt = json.loads((TINY_COCO / "annotations" / "instances_val2017.json").read_text())
    chosen = sorted(gt["images"], key=lambda img: img["file_name"])[:USER_IMAGES]
    images = root / "photos"
    images.mkdir(parents=True)
    for img in chosen:
        shutil.copy(TINY_COCO / "val2017" / img["file_name"], images / img["file_name"])
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.full((20, 10000, 3), 128, np.uint8)).save(images / "wide.jpg")
    ids = {img["id"]: n for n, img in enumerate(reversed(chosen), start=1)}
    # the GT also holds images the folder does not have (a user's GT of a larger set): not scored, never missed
    elsewhere = sorted(gt["images"], key=lambda img: img["file_name"])[USER_IMAGES:USER_IMAGES + GT_ONLY_IMAGES]
    ids.update({img["id"]: USER_IMAGES + 2 + k for k, img in enumerate(elsewhere)})
    own = {"images": [{**img, "id": ids[img["id"]]} for img in chosen]
           + [{"id": USER_IMAGES + 1, "file_name": "wide.jpg", "height": 20, "width": 10000}]
           + [{**img, "id": ids[img["id"]]} for img in elsewhere],
           "annotations": [{**a, "image_id": ids[a["image_id"]]} for a in gt["annotations"] if a["image_id"] in ids],
           "categories": gt["categories"]}
    (root / "gt.json").write_text(json.dumps(own))
    return images, root / "gt.json"


def users_argv(images: Path, gt: Path, out: Path) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--gt_json", str(gt), "--tiny"]


@pytest.fixture(scope="module")
def users_run(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """(OUT, the folder, its GT, stdout + stderr) of an uninterrupted run on `users_folder`."""
    if not TINY_COCO.exists():
        pytest.skip(f"real test data not present: {TINY_COCO}")
    root = tmp_path_factory.mktemp("users")
    images, gt = users_folder(root)
    code, stdout, stderr = run_main(pipeline.main, users_argv(images, gt, root / "out"))
    assert code == 0, stderr
    return root / "out", images, gt, stdout + stderr


@pytest.mark.slow
def test_a_users_folder_with_its_own_gt_ids_and_a_thin_image_runs_through(users_run):
    out, images, gt, log = users_run
    assert f"--gt_json {gt}: {USER_IMAGES} of {USER_IMAGES + 1} images matched by file name" in log
    assert "not in --gt_json, left out of the run: broken.jpg" in log
    assert "warning: skipping wide.jpg: 10000x20 (w x h)" in log
    masks = json.loads((out / "masks" / "masks.json").read_text())
    gt_ids = {img["file_name"]: img["id"] for img in json.loads(gt.read_text())["images"]}
    photos = sorted(p.name for p in images.glob("*.jpg") if p.name not in ("broken.jpg", "wide.jpg"))
    assert {img["file_name"]: img["id"] for img in masks["images"]} == {name: gt_ids[name] for name in photos}
    corloc = json.loads((out / "eval" / "corloc.json").read_text())
    assert corloc["num_images"] == USER_IMAGES  # every photo of the GT is scored
    rows = {row["metric"]: row for row in json.loads((out / "eval" / "metrics.json").read_text())}
    # scored over the run's photos only: the GT's other images (and the skipped thin one) are no misses
    assert rows["maskdistill masks mask AP"]["against"].startswith(
        f"gt.json ({USER_IMAGES} of its {USER_IMAGES + 1 + GT_ONLY_IMAGES} images")
    assert len((out / "eval" / "gt_semantic.txt").read_text().split()) == USER_IMAGES
    assert rows["Mask R-CNN round 2 mask AP"]["value"] is not None
    step = json.loads((out / "cluster" / "step.json").read_text())
    assert step["result"]["labelled"] == "$OUT/cluster/labelled.json"
    page = (out / "report.html").read_text()  # the models are linked where they are, not by their recorded $OUT
    assert "href='maskrcnn/round2/model_final.pth'" in page and "$OUT" not in page


def final_outputs(out: Path) -> dict[str, bytes]:
    """The files a run leaves that another run must reproduce (paths of OUT written as OUT)."""
    names = ["masks/masks.json", "cluster/labelled.json", "maskrcnn/round2/train_results.json", "semantic/train.txt",
             "eval/metrics.json", "eval/corloc.json", "eval/miou.json"]
    names += sorted(p.relative_to(out).as_posix() for p in (out / "semantic" / "labels").glob("*.png"))
    names += sorted(p.relative_to(out).as_posix() for p in (out / "deeplab").rglob("labels/*.png"))
    return {name: (out / name).read_bytes().replace(str(out).encode(), b"OUT") for name in names}


@pytest.mark.slow
def test_a_kill_at_each_stage_boundary_then_a_rerun_gives_the_uninterrupted_outputs(users_run, tmp_path, monkeypatch):
    from orchestrate import pipeline as pipe

    uninterrupted, images, gt, _ = users_run
    out = tmp_path / "out"
    for stage in ("masks", "cluster", "mask_rcnn", "semantic", "deeplab"):
        real = getattr(pipe, f"run_{stage}")

        def killed_after(*args, real=real):
            real(*args)  # the stage's outputs are written, its step is not marked done
            raise KeyboardInterrupt

        monkeypatch.setattr(pipe, f"run_{stage}", killed_after)
        with pytest.raises(KeyboardInterrupt):
            pipeline.main(users_argv(images, gt, out))
        monkeypatch.undo()
    assert pipeline.main(users_argv(images, gt, out)) == 0
    assert final_outputs(out) == final_outputs(uninterrupted)


@pytest.mark.slow
def test_a_copied_out_uses_its_own_files(users_run, tmp_path):
    import shutil

    original, images, gt, _ = users_run
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    args = pipeline.build_parser().parse_args(users_argv(images, gt, copy) + ["--crf_rounds", "0", "--overwrite"])
    records = run_pipeline(settings_from_args(args))
    assert [r.name for r in records if r.status == "ran"] == ["deeplab", "eval"]
    # the copy's deeplab trained on the copy's labels, into the copy
    config = json.loads((copy / "deeplab" / "step.json").read_text())["result"]["config"]
    assert config["data"]["label_dir"] == "$OUT/semantic/labels" and config["output_dir"] == "$OUT/deeplab"
    assert str(original) not in (copy / "deeplab" / "step.json").read_text()


@pytest.mark.slow
def test_an_unreadable_image_is_skipped_and_named_and_the_run_goes_on(tmp_path, capsys):
    import shutil

    from orchestrate import pipeline as pipe
    from utils.steps import run_steps

    if not TINY_COCO.exists():
        pytest.skip(f"real test data not present: {TINY_COCO}")
    images = tmp_path / "photos"
    images.mkdir()
    for path in sorted((TINY_COCO / "val2017").glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    args = pipeline.build_parser().parse_args(["--images", str(images), "--out", str(tmp_path / "out"), "--tiny",
                                               "--num_classes", "1"])
    s = pipe.check_settings(settings_from_args(args))
    records = run_steps(s.out, pipe.build_steps(s)[:2])  # masks, then the stage that read them
    assert records[0].result["images"] == 2 and records[0].result["skipped_images"] == 1
    assert records[1].status == "ran" and records[1].result["num_clusters"] == 1
    assert "1 image(s) could not be read and were left out: broken.jpg" in capsys.readouterr().err
