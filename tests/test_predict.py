"""predict.py: a trained Mask R-CNN on a plain folder of images, without a hand-made COCO file (issue 20,
section 5): the folder's images numbered and named in images.json, results.json and predictions.json that agree
with train_net.py --eval_only on those images, a gallery, unreadable images skipped, and refusals that write
nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import eval_instances
import predict
from detectron2_train import train_net
from tests.cli_helpers import error_line, run_main
from tests.helpers.synthetic_shapes import make_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "detectron2" / "tiny_test.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a tiny Mask R-CNN trained 2 iterations, its training set, a plain folder of 3 of its images in two
    sub-folders plus an unreadable file)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("predict")
    data = make_dataset(root / "syn", num_images=3, seed=2)
    code, _, err = run_main(train_net.main, [
        "--config", str(TINY), "--output_dir", str(root / "run"), "--device", "cpu", "--train_json", str(data),
        "--train_root", str(data.parent / "images"), "--set", "solver.max_iter=2", "solver.warmup_iters=1",
        "solver.steps=[1]", "solver.ims_per_batch=2", "solver.checkpoint_period=100"])
    assert code == 0, err
    photos = root / "photos"
    for i, image in enumerate(sorted((data.parent / "images").iterdir())):
        target = photos / ("b" if i else "a") / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    (photos / "b" / "broken.jpg").write_bytes(b"not an image")
    return root / "run" / "model_final.pth", data, photos


@pytest.mark.slow
def test_predict_on_a_plain_folder_writes_results_a_dataset_and_a_gallery(trained, tmp_path):
    weights, data, photos = trained
    out = tmp_path / "pred"
    code, stdout, err = run_main(predict.main, ["--weights", str(weights), "--images", str(photos), "--out", str(out),
                                                "--score_thresh", "0", "--device", "cpu"])
    assert code == 0, err
    names = ["a/0001.png", "b/0002.png", "b/0003.png"]
    images = json.loads((out / "images.json").read_text())
    sizes = {img["file_name"]: (img["height"], img["width"]) for img in json.loads(data.read_text())["images"]}
    assert [(img["id"], img["file_name"]) for img in images["images"]] == list(enumerate(names, 1))
    assert all((img["height"], img["width"]) == sizes[img["file_name"].split("/")[1]] for img in images["images"])
    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} <= {1, 2, 3}
    for image_id in {r["image_id"] for r in results}:  # best first per image
        scores = [r["score"] for r in results if r["image_id"] == image_id]
        assert scores == sorted(scores, reverse=True)
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["images"] == images["images"] and predictions["categories"] == images["categories"]
    assert predictions["annotations"] == [{**r, "id": i + 1} for i, r in enumerate(results)]
    assert [s["file_name"] for s in predictions["skipped_images"]] == ["b/broken.jpg"]
    page = (out / "gallery" / "index.html").read_text()
    assert all(name in page for name in names) and "broken.jpg" not in page
    assert (out / "config.yaml").is_file()
    assert stdout.splitlines()[0].startswith("skipped b/broken.jpg: ")
    assert stdout.splitlines()[-1] == f"wrote {len(results)} predictions on 3 images (1 skipped) to {out}"

    # The same model through train_net.py --eval_only on images.json: the same results.
    again = tmp_path / "eval_only.json"
    code, _, err = run_main(train_net.main, ["--config", str(TINY), "--eval_only", "--weights", str(weights),
                                             "--test_json", str(out / "images.json"), "--test_root", str(photos),
                                             "--results", str(again), "--no_eval", "--device", "cpu",
                                             "--set", "model.box_score_thresh=0.0",
                                             "--output_dir", str(tmp_path / "eval_only")])
    assert code == 0, err
    assert json.loads(again.read_text()) == results

    # predictions.json names its images: scored against a GT numbering them otherwise (ids 7, 5, 6).
    gt = json.loads(data.read_text())
    new_id = {1: 7, 2: 5, 3: 6}
    gt["images"] = [{**img, "id": new_id[img["id"]], "file_name": f"{'b' if img['id'] > 1 else 'a'}/{img['file_name']}"}
                    for img in gt["images"]]
    gt["annotations"] = [{**a, "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    code, stdout, err = run_main(eval_instances.main, ["--input_file", str(out / "predictions.json"), "--gt_file",
                                                       str(tmp_path / "gt.json"), "--class_agnostic"])
    assert code == 0, err
    assert "note: scored over 3 of 3 GT images (matched by file_name)" in stdout

    # A second run into the same folder is refused, and leaves the first run's files as they are.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_main(predict.main, ["--weights", str(weights), "--images", str(photos), "--out", str(out)])
    assert code == 2 and error_line(err) == (f"error: output {out / 'images.json'} already exists; pass --overwrite "
                                             "to replace it")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    from detectron2_train.engine import SCHEMA
    from detectron2_train.modeling import build_model
    from utils.checkpoint import save_checkpoint
    from utils.config import load_config
    from utils.fingerprint import fingerprint

    cfg = load_config(TINY, [], SCHEMA)
    weights = tmp_path / "mask_rcnn.pth"  # untrained: every case is refused before the model is built
    save_checkpoint(weights, build_model(cfg, 1), config=cfg, fingerprint=fingerprint("mask_rcnn", cfg))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.jpg").write_bytes(b"not an image")
    deeplab = tmp_path / "deeplab.pth"
    torch.save({"model": {"head.weight": torch.zeros(2, 2)}, "fingerprint": {"kind": "deeplab"}}, deeplab)
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(weights, weights_only=False)["model"], bare)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = {
        f"{deeplab} is a DeepLab-v3 checkpoint (segmentation/train.py); expected a Mask R-CNN checkpoint "
        "(detectron2_train/train_net.py)": ["--weights", str(deeplab)],
        f"{bare} records no config (a bare state dict): pass --config, the YAML the model was trained with":
            ["--weights", str(bare)],
        f"weights not found: {tmp_path / 'nope.pth'} (a train_net.py checkpoint such as OUT/model_final.pth)":
            ["--weights", str(tmp_path / "nope.pth")],
        f"image folder not found: {tmp_path / 'nowhere'}": ["--weights", str(weights), "--images",
                                                            str(tmp_path / "nowhere")],
        f"no readable image under {tmp_path / 'empty'}": ["--weights", str(weights), "--images",
                                                          str(tmp_path / "empty")],
        f"no readable image under {photos} (1 unreadable, e.g. broken.jpg)": ["--weights", str(weights)],
    }
    for message, argv in cases.items():
        argv = [*argv, "--out", str(out), "--device", "cpu"] + ([] if "--images" in argv else ["--images", str(photos)])
        code, _, err = run_main(predict.main, argv)
        assert code == 2 and error_line(err) == f"error: {message}", err
        assert not out.exists()
