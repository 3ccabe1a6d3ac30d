"""gen_pa_masks.py: the oracle's output equals the grouping of the GT's affinity, the output contract of
gen_masks.py, worker processes, a PA checkpoint, and one-line errors before any output."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

import gen_pa_masks
from detectron2_train.affinity import build_affinity_model
from distill.grouping import GroupingOptions, group, oracle_affinity
from utils.checkpoint import save_checkpoint
from utils.coco_io import annotations_by_image, decode_segmentation
from utils.errors import run_cli


def run(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """gen_pa_masks.py in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["gen_pa_masks.py", *map(str, argv)])
    with pytest.raises(SystemExit) as stop:
        run_cli(gen_pa_masks.main)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


@pytest.fixture
def val(tiny_coco):
    return tiny_coco / "val2017", tiny_coco / "annotations" / "instances_val2017.json"


def test_oracle_output_is_the_grouping_of_the_gt_affinity(val, tmp_path, monkeypatch, capsys):
    images, gt_json = val
    out = tmp_path / "pa.json"
    code, stdout, stderr = run(monkeypatch, capsys, "--dataset", "folder", "--dataset_root", images, "--affinity", "oracle",
                               "--gt_json", gt_json, "--max_images", 2, "--topk", 5, "--num_workers", 0,
                               "--pred_json_path", out)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert sorted(data) == ["annotations", "categories", "images", "info", "skipped_images"]
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    assert data["info"]["settings"]["topk"] == 5 and data["info"]["settings"]["affinity"] == "oracle"
    assert data["info"]["description"] == "ggn pseudo-masks"
    assert json.loads(out.with_suffix(".results.json").read_text()) == data["annotations"]
    assert yaml.safe_load(out.with_suffix(".config.yaml").read_text()) == data["info"]["settings"]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    assert "wrote 2 images (0 skipped)" in stdout

    gt = json.loads(gt_json.read_text())
    gt_by_image = annotations_by_image(gt["annotations"])
    written = annotations_by_image(data["annotations"])
    for image in data["images"]:
        expected = group(oracle_affinity(gt_by_image.get(image["id"], []), image["height"], image["width"]),
                         GroupingOptions(topk=5))
        masks = [decode_segmentation(a["segmentation"], image["height"], image["width"]) for a in written[image["id"]]]
        assert 0 < len(masks) <= 5
        assert np.array_equal(np.stack(masks).astype(bool), expected.masks)
        assert [a["score"] for a in written[image["id"]]] == pytest.approx(expected.scores.tolist())
        assert all(a["category_id"] == 1 and len(a["bbox"]) == 4 for a in written[image["id"]])


def test_worker_processes_give_the_same_output(val, tmp_path, monkeypatch, capsys):
    images, gt_json = val
    outputs = []
    for workers in (0, 1):
        out = tmp_path / f"pa{workers}.json"
        code, _, stderr = run(monkeypatch, capsys, "--dataset", "folder", "--dataset_root", images, "--affinity",
                              "oracle", "--gt_json", gt_json, "--max_images", 2, "--num_workers", workers,
                              "--pred_json_path", out)
        assert code == 0, stderr
        outputs.append(json.loads(out.read_text())["annotations"])
    assert outputs[0] == outputs[1] and outputs[0]


def test_a_pa_checkpoint_drives_the_grouping(val, tmp_path, monkeypatch, capsys):
    images, _ = val
    torch.manual_seed(0)
    model = build_affinity_model({"backbone": "tiny", "fpn_channels": 16, "head_channels": 8, "norm": "gn"})
    checkpoint = tmp_path / "pa.pth"
    save_checkpoint(checkpoint, model, config={"model": {"backbone": "tiny", "fpn_channels": 16, "head_channels": 8,
                                                         "norm": "gn"},
                                               "input": {"min_size_test": 96, "max_size_test": 128}})
    out = tmp_path / "pa.json"
    code, _, stderr = run(monkeypatch, capsys, "--dataset", "folder", "--dataset_root", images, "--affinity", checkpoint,
                          "--max_images", 1, "--num_workers", 0, "--pred_json_path", out)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    image = data["images"][0]
    assert len(data["images"]) == 1 and data["info"]["settings"]["affinity"] == str(checkpoint.resolve())
    for ann in data["annotations"]:  # whatever random weights give, masks are full-size and scored
        assert ann["segmentation"]["size"] == [image["height"], image["width"]] and 0 <= ann["score"] <= 1


def test_bad_input_is_one_line_and_writes_nothing(val, tmp_path, monkeypatch, capsys):
    images, gt_json = val
    gt = json.loads(gt_json.read_text())
    partial = tmp_path / "partial.json"
    missing, missing_name = gt["images"][0]["id"], gt["images"][0]["file_name"]
    partial.write_text(json.dumps({**gt, "images": gt["images"][1:],
                                   "annotations": [a for a in gt["annotations"] if a["image_id"] != missing]}))
    resized = tmp_path / "resized.json"
    # Polygon annotations only: an RLE would already disagree with its own file's image size.
    polygons = [a for a in gt["annotations"] if isinstance(a["segmentation"], list)]
    resized.write_text(json.dumps({**gt, "annotations": polygons,
                                   "images": [dict(i, height=i["height"] + 1) for i in gt["images"]]}))
    out = tmp_path / "pa.json"
    base = ["--dataset", "folder", "--dataset_root", images, "--pred_json_path", out, "--num_workers", 0]
    cases = {
        "--affinity oracle needs --gt_json": ["--affinity", "oracle"],
        f"{missing_name} is not in --gt_json {partial} (matched by file_name)": ["--affinity", "oracle", "--gt_json",
                                                                                 partial],
        "(height x width) but --gt_json says": ["--affinity", "oracle", "--gt_json", resized],
        "PA checkpoint not found": ["--affinity", tmp_path / "missing.pth"],
    }
    for message, extra in cases.items():
        code, stdout, stderr = run(monkeypatch, capsys, *base, *extra)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, (message, stderr)
        assert not out.exists() and not list(tmp_path.glob("pa.*"))
    out.write_text("{}")
    code, _, stderr = run(monkeypatch, capsys, *base, "--affinity", "oracle", "--gt_json", gt_json)
    assert code == 2 and "already exists" in stderr


def test_shards_merge_resume_and_gallery_come_from_the_job(val, tmp_path, monkeypatch, capsys):
    """Two shards merged equal a single run; a resume after a killed run writes the same file; the
    gallery holds one overlay per image."""
    images, gt_json = val
    base = ["--dataset", "folder", "--dataset_root", images, "--affinity", "oracle", "--gt_json", gt_json,
            "--max_images", 3, "--topk", 3, "--globalization", 0, "--num_workers", 0]
    single = tmp_path / "single.json"
    code, _, stderr = run(monkeypatch, capsys, *base, "--pred_json_path", single, "--vis_dir", tmp_path / "vis")
    assert code == 0, stderr
    expected = json.loads(single.read_text())
    assert len(expected["images"]) == 3
    assert len(list((tmp_path / "vis").glob("*.png"))) == 3
    page = (tmp_path / "vis" / "index.html").read_text()
    assert all(image["file_name"] in page for image in expected["images"]) and "ggn" in page

    sharded = tmp_path / "sharded.json"
    for shard in ("0/2", "1/2"):
        code, _, stderr = run(monkeypatch, capsys, *base, "--pred_json_path", sharded, "--shard", shard)
        assert code == 0, stderr
    code, stdout, stderr = run(monkeypatch, capsys, "--merge", "--pred_json_path", sharded)
    assert code == 0 and "merged 2 shards: 3 images" in stdout, stderr
    assert json.loads(sharded.read_text()) == expected

    # A killed run: the part holds its header and the first image's record only.
    resumed = tmp_path / "resumed.json"
    parts = tmp_path / "resumed.json.parts"
    parts.mkdir()
    first = expected["images"][0]
    header = {"kind": "header", "settings": expected["info"]["settings"]}
    record = {"index": 0, "image": first,
              "annotations": [{k: v for k, v in a.items() if k != "id"} for a in expected["annotations"]
                              if a["image_id"] == first["id"]]}
    (parts / "shard-00000-of-00001.jsonl.inprogress").write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    code, _, stderr = run(monkeypatch, capsys, *base, "--pred_json_path", resumed)
    assert code == 2 and "pass --resume" in stderr
    code, _, stderr = run(monkeypatch, capsys, *base, "--pred_json_path", resumed, "--topk", 4, "--resume")
    assert code == 2 and "was made with topk=3, not 4" in stderr
    code, stdout, stderr = run(monkeypatch, capsys, *base, "--pred_json_path", resumed, "--resume")
    assert code == 0 and "wrote 3 images (0 skipped)" in stdout, stderr
    assert json.loads(resumed.read_text()) == expected


def test_resume_refuses_a_retrained_checkpoint_and_skips_unreadable_images(tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    for n in (1, 2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{n}.jpg")
    (images / "3.jpg").write_bytes(b"not an image")
    config = {"model": {"backbone": "tiny", "fpn_channels": 16, "head_channels": 8, "norm": "gn"},
              "input": {"min_size_test": 40, "max_size_test": 64}}
    checkpoint = tmp_path / "pa.pth"
    torch.manual_seed(0)
    save_checkpoint(checkpoint, build_affinity_model(config["model"]), config=config)
    out = tmp_path / "pa.json"
    base = ["--dataset", "folder", "--dataset_root", images, "--affinity", checkpoint, "--num_workers", 0,
            "--globalization", 0, "--pred_json_path", out]
    code, stdout, stderr = run(monkeypatch, capsys, *base)
    assert code == 0 and "wrote 2 images (1 skipped)" in stdout, stderr
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == ["1.jpg", "2.jpg"]
    assert [s["file_name"] for s in data["skipped_images"]] == ["3.jpg"]
    from utils.fingerprint import file_digest

    assert data["info"]["settings"]["affinity_sha256"] == file_digest(checkpoint)

    # Same path, other weights: the parts of the first predictor are refused.
    (tmp_path / "pa.json.parts").mkdir()
    part = tmp_path / "pa.json.parts" / "shard-00000-of-00001.jsonl.inprogress"
    part.write_text(json.dumps({"kind": "header", "settings": data["info"]["settings"]}) + "\n")
    torch.manual_seed(1)
    save_checkpoint(checkpoint, build_affinity_model(config["model"]), config=config)
    code, _, stderr = run(monkeypatch, capsys, *base, "--resume", "--overwrite")
    assert code == 0, stderr  # --overwrite starts again
    part.parent.mkdir(exist_ok=True)
    # a part holding an image (one holding none is simply replaced, see tests/test_gen_masks_safety.py)
    part.write_text(json.dumps({"kind": "header", "settings": data["info"]["settings"]}) + "\n"
                    + json.dumps({"index": 0, "image": data["images"][0], "annotations": []}) + "\n")
    out.unlink()
    code, _, stderr = run(monkeypatch, capsys, *base, "--resume")
    assert code == 2 and "was made with affinity_sha256=" in stderr and stderr.count("\n") == 1


def test_a_run_without_a_terminal_prints_progress_lines(tmp_path, monkeypatch, capsys):
    """Not a TTY (a log file): the image-size pass of the job and the grouping print utils/progress lines."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for n in (1, 2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{n}.jpg")
        gt["images"].append({"id": n, "file_name": f"{n}.jpg", "height": 40, "width": 48})
        gt["annotations"].append({"id": n, "image_id": n, "category_id": 1, "iscrowd": 0, "area": 100.0,
                                  "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(json.dumps(gt))
    monkeypatch.setenv("MASKDISTILL_PROGRESS_SECONDS", "1e-9")
    code, _, stderr = run(monkeypatch, capsys, "--dataset", "folder", "--dataset_root", images, "--affinity", "oracle",
                          "--gt_json", gt_json, "--num_workers", 0, "--pred_json_path", tmp_path / "pa.json")
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("PA masks: ")] == [
        "PA masks: 1/2 img (50%)", "PA masks: 2/2 img (100%)", "PA masks: 2/2 img (100%)"]
    assert any(line.startswith("image sizes: 2/2 img (100%)") for line in lines)


def test_oracle_matches_a_gt_whose_ids_differ_from_the_file_names(val, tmp_path, monkeypatch, capsys):
    """A GT numbering the images 1..N in reverse name order (ids unrelated to the file names the folder's ids
    come from): each image gets the affinity of its own GT, found by file_name, so the masks are those of the
    GT with COCO's ids (it compared an image with another image's GT size and refused before)."""
    images, gt_json = val
    gt = json.loads(gt_json.read_text())
    ordered = sorted(gt["images"], key=lambda i: i["file_name"], reverse=True)
    new_id = {img["id"]: k + 1 for k, img in enumerate(ordered)}
    renumbered = tmp_path / "gt_renumbered.json"
    renumbered.write_text(json.dumps({**gt, "images": [{**i, "id": new_id[i["id"]]} for i in ordered],
                                      "annotations": [{**a, "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]}))
    base = ["--dataset", "folder", "--dataset_root", images, "--affinity", "oracle", "--max_images", 2, "--topk", 3,
            "--globalization", 0, "--num_workers", 0]
    outputs = {}
    for name, gt_file in (("coco", gt_json), ("renumbered", renumbered)):
        outputs[name] = tmp_path / f"pa_{name}.json"
        code, _, stderr = run(monkeypatch, capsys, *base, "--gt_json", gt_file, "--pred_json_path", outputs[name])
        assert code == 0, stderr
    expected, found = (json.loads(outputs[n].read_text()) for n in ("coco", "renumbered"))
    assert found["images"] == expected["images"] and len(found["annotations"]) > 0
    assert found["annotations"] == expected["annotations"]
