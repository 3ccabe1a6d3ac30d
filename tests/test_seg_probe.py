"""Linear probe (linear_finetune.py), clustering evaluation and CRF rounds, end to end on tiny configurations."""
import json

import numpy as np
import pytest
import torch
import yaml

from segmentation import eval_cluster, linear_finetune
from seg_helpers import make_synthetic_set, tiny_overrides
from training_helpers import Killed, assert_same_weights, kill_after, records, tear_metrics
from segmentation.engine import DEFAULTS
from segmentation.kmeans_eval import hungarian_from_counts
from segmentation.model import build_from_config
from utils.crf import CRFParams
from segmentation.probe import PROBE_SCHEMA
from segmentation.rounds import train_plus_crf
from utils.checkpoint import save_checkpoint
from utils.config import load_config
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import fingerprint
from utils.label_png import read_label_png
from evaluation.metrics import hungarian_match

torch.set_num_threads(1)


@pytest.fixture
def voc_tiny(tmp_path, voc_mini, repo_root):
    """A tiny experiment on voc_mini's 3 images (train = val) and a test-made 'trained' DeepLab checkpoint."""
    voc = voc_mini / "VOC2012"
    exp = {
        "_base_": str(repo_root / "configs/segmentation/tiny_test.yml"),
        "pretrained": str(tmp_path / "deeplab" / "model_final.pth"),
        "data": {"image_dir": str(voc / "JPEGImages"), "label_dir": str(voc / "SegmentationClass"),
                 "train_list": str(voc / "ImageSets/Segmentation/trainval.txt"),
                 "val_image_dir": str(voc / "JPEGImages"), "val_label_dir": str(voc / "SegmentationClass"),
                 "val_list": str(voc / "ImageSets/Segmentation/val.txt"), "num_classes": 21},
        "solver": {"max_iter": 4, "batch_size": 2, "base_lr": 0.1, "checkpoint_period": 2},
    }
    (tmp_path / "linear_tiny.yml").write_text(yaml.safe_dump(exp))
    (tmp_path / "one.txt").write_text("2011_000003\n")  # one val image keeps the 21-class CRF quick
    (tmp_path / "env.yml").write_text(yaml.safe_dump({"root_dir": str(tmp_path / "results")}))
    config = load_config(tmp_path / "linear_tiny.yml", defaults=PROBE_SCHEMA)
    torch.manual_seed(0)
    save_checkpoint(exp["pretrained"], build_from_config(config), iteration=0, config=config)
    return tmp_path


@pytest.mark.slow
def test_linear_finetune_end_to_end_prints_miou(voc_tiny, capsys):
    assert linear_finetune.main(["--config_env", str(voc_tiny / "env.yml"),
                                 "--config_exp", str(voc_tiny / "linear_tiny.yml")]) == 0
    stdout = capsys.readouterr().out
    assert "mIoU" in stdout and "aeroplane" in stdout
    out = voc_tiny / "results" / "linear_tiny"
    result = json.loads((out / "results.json").read_text())
    assert 0.0 <= result["mIoU"] <= 1.0 and f"mIoU {100 * result['mIoU']:.2f}" in stdout
    # Only the 1x1 classifier changed.
    before = torch.load(voc_tiny / "deeplab" / "model_final.pth", weights_only=False)["model"]
    after = torch.load(out / "probe_final.pth", weights_only=False)["model"]
    for key in before:
        if not key.startswith("head.4."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.4.weight"], after["head.4.weight"])
    # Evaluate the saved probe again, with CRF post-processing (in-process: a second interpreter is slow here).
    assert linear_finetune.main(["--config_env", str(voc_tiny / "env.yml"), "--config_exp",
                                 str(voc_tiny / "linear_tiny.yml"), "--model_path", str(out / "probe_final.pth"),
                                 "--crf-postprocess", "--set", f"data.val_list={voc_tiny / 'one.txt'}"]) == 0
    crf = json.loads((out / "results_crf.json").read_text())
    assert crf["crf_postprocess"] and 0.0 <= crf["mIoU"] <= 1.0


def test_linear_finetune_missing_pretrained_names_the_file(voc_tiny):
    with pytest.raises(UserError, match=r"model checkpoint not found: .*nope\.pth"):
        linear_finetune.main(["--config_env", str(voc_tiny / "env.yml"), "--config_exp",
                              str(voc_tiny / "linear_tiny.yml"), "--set", f"pretrained={voc_tiny / 'nope.pth'}"])
    assert not (voc_tiny / "results").exists()  # nothing written on bad input


def test_hungarian_from_counts_agrees_with_shared_matcher():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 5, 500), rng.integers(0, 5, 500)
    counts = np.zeros((5, 5), np.int64)
    np.add.at(counts, (pred, target), 1)
    assert hungarian_from_counts(counts) == hungarian_match(pred, target, 5, 5)


def test_eval_cluster_runs_on_voc_mini(voc_tiny, capsys):
    assert eval_cluster.main(["--config", str(voc_tiny / "linear_tiny.yml"), "--device", "cpu",
                              "--model_path", str(voc_tiny / "deeplab" / "model_final.pth"),
                              "--output", str(voc_tiny / "c.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((voc_tiny / "c.json").read_text())
    assert f"mIoU: {100 * result['mIoU']:.2f}" in printed and len(result["per_class_iou"]) == 21


class ColourEmbedding(torch.nn.Module):
    """A hand-made network whose pixel embedding is the pixel's (normalised) colour."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_cluster_evaluation_is_exact_on_colour_squares(tmp_path, repo_root):
    """Background, red and green pixels embed to three separate directions, so K-means finds exactly the
    classes: Hungarian matching sends each cluster to its class and every IoU is 1."""
    from segmentation.engine import SCHEMA, build_val_dataset, class_names
    from segmentation.kmeans_eval import evaluate_clusters

    data = make_synthetic_set(tmp_path / "data", count=4)
    config = load_config(repo_root / "configs/segmentation/tiny_test.yml", tiny_overrides(data), defaults=SCHEMA)
    dataset = build_val_dataset(config)
    result = evaluate_clusters(ColourEmbedding(), dataset, 3, class_names(config), torch.device("cpu"))
    pixels = np.bincount(np.concatenate([read_label_png(data["label_dir"] / f"{n}.png").ravel()
                                         for n in data["names"]]), minlength=3)
    assert result["confusion"] == np.diag(pixels).tolist()
    assert result["mIoU"] == 1.0 and result["per_class_iou"] == {"0": 1.0, "1": 1.0, "2": 1.0}


def test_cluster_evaluation_may_fit_on_a_few_images_and_still_scores_them_all(tmp_path, repo_root):
    """max_fit_images: K-means embeds only that many images (evenly spaced) to fit; every image is assigned."""
    from segmentation.engine import SCHEMA, build_val_dataset, class_names
    from segmentation.kmeans_eval import evaluate_clusters

    class Counting(ColourEmbedding):
        calls = 0

        def embed(self, images):
            Counting.calls += 1
            return super().embed(images)

    data = make_synthetic_set(tmp_path / "data", count=4)
    config = load_config(repo_root / "configs/segmentation/tiny_test.yml", tiny_overrides(data), defaults=SCHEMA)
    dataset = build_val_dataset(config)
    result = evaluate_clusters(Counting(), dataset, 3, class_names(config), torch.device("cpu"), max_fit_images=2)
    assert Counting.calls == 2 + len(dataset)  # the fit's 2, then the assignment of all 4
    pixels = sum(read_label_png(data["label_dir"] / f"{n}.png").size for n in data["names"])
    assert np.asarray(result["confusion"]).sum() == pixels and result["mIoU"] == 1.0


def test_train_plus_crf_writes_each_rounds_labels_and_resumes(tmp_path, repo_root):
    data = make_synthetic_set(tmp_path / "data", count=4)
    overrides = tiny_overrides(data) + [f"output_dir={tmp_path / 'rounds'}", "solver.max_iter=3",
                                        "solver.checkpoint_period=0", "data.val_list=null"]
    config = load_config(repo_root / "configs/segmentation/tiny_test.yml", overrides, defaults=DEFAULTS)
    result = train_plus_crf(config, DistInfo(), rounds=1, workers=2)
    labels = tmp_path / "rounds" / "round1" / "labels"
    for name in data["names"]:
        label = read_label_png(labels / f"{name}.png")
        assert label.shape == (64, 64) and label.max() < 3
    assert result["checkpoint"] == str(tmp_path / "rounds" / "round1" / "model_final.pth")
    assert (tmp_path / "rounds" / "round0" / "model_final.pth").exists()
    stamp = (labels / "img_000.png").stat().st_mtime_ns
    train_plus_crf(config, DistInfo(), rounds=1, workers=2)  # everything done: nothing is redone
    assert (labels / "img_000.png").stat().st_mtime_ns == stamp
    # Other CRF parameters for round 1 are refused (round 0 is unaffected and stays done).
    with pytest.raises(UserError, match=r"round 1 in .*round1: it was made with crf\.iterations=10, not 5; use the same "
                                        r"settings, or --overwrite to run it again"):
        train_plus_crf(config, DistInfo(), rounds=1, workers=2, params=CRFParams(iterations=5))
    assert (labels / "img_000.png").stat().st_mtime_ns == stamp


@pytest.fixture
def synthetic_probe(tmp_path, repo_root):
    """A tiny probe experiment on a test-made set, with a test-made 'trained' DeepLab-v3 in its own folder."""
    data = make_synthetic_set(tmp_path / "data", count=4)
    config = load_config(repo_root / "configs/segmentation/tiny_test.yml", tiny_overrides(data), defaults=DEFAULTS)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "deeplab" / "model_final.pth", build_from_config(config), iteration=0, config=config)
    exp = tmp_path / "probe_exp.yml"
    exp.write_text(yaml.safe_dump({"_base_": str(repo_root / "configs/segmentation/tiny_test.yml"),
                                   "pretrained": str(tmp_path / "deeplab" / "model_final.pth"),
                                   "solver": {"max_iter": 2, "checkpoint_period": 1, "keep_checkpoints": 1}}))
    args = ["--config_exp", str(exp), "--set", *tiny_overrides(data)]
    return tmp_path, args


def test_probe_checks_the_val_set_before_training(synthetic_probe):
    tmp_path, args = synthetic_probe
    with pytest.raises(UserError, match=r"label file not found: .*nope/img_000\.png"):
        linear_finetune.main(args + [f"output_dir={tmp_path / 'probe'}", f"data.val_label_dir={tmp_path / 'nope'}"])
    assert not (tmp_path / "probe").exists()  # no training ran


def test_probe_refuses_a_folder_of_deeplab_checkpoints(synthetic_probe):
    tmp_path, args = synthetic_probe
    with pytest.raises(UserError, match="is the folder of the network it probes"):
        linear_finetune.main(args + [f"output_dir={tmp_path / 'deeplab'}"])
    config = torch.load(tmp_path / "deeplab" / "model_final.pth", weights_only=False)["config"]
    save_checkpoint(tmp_path / "other" / "model_0000100.pth", build_from_config(config), iteration=100,
                    config=config, fingerprint=fingerprint("deeplab", config))
    with pytest.raises(UserError, match=r"cannot resume from .*model_0000100\.pth: it was made by deeplab, not "
                                        r"linear_probe; use another output folder, or --overwrite"):
        linear_finetune.main(args + [f"output_dir={tmp_path / 'other'}"])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["model_0000100.pth"]


def test_killed_probe_resumes_exactly_and_only_its_own_run(synthetic_probe, monkeypatch):
    """Killed after iteration 3 (checkpoint at 2, a torn metrics line): the automatic resume ends with the
    weights and log of an uninterrupted run; another `pretrained` network or other data are refused, and
    results.json is never replaced silently."""
    tmp_path, args = synthetic_probe
    args = args + ["solver.max_iter=4", "solver.checkpoint_period=2", "solver.log_period=1"]
    assert linear_finetune.main(args + [f"output_dir={tmp_path / 'straight'}"]) == 0
    killed = tmp_path / "killed"
    kill_after(monkeypatch, 3)
    with pytest.raises(Killed):
        linear_finetune.main(args + [f"output_dir={killed}"])
    monkeypatch.undo()
    tear_metrics(killed / "metrics.jsonl")

    config = torch.load(tmp_path / "deeplab" / "model_final.pth", weights_only=False)["config"]
    torch.manual_seed(1)  # another network of the same architecture
    save_checkpoint(tmp_path / "deeplab2" / "model_final.pth", build_from_config(config), iteration=0, config=config)
    with pytest.raises(UserError, match=r"cannot resume from .*killed/model_0000002\.pth: it was made with "
                                        r"pretrained=.*deeplab/model_final\.pth \(sha256 [0-9a-f]{12}\), not "
                                        r".*deeplab2/model_final\.pth \(sha256 [0-9a-f]{12}\); use the same settings, "
                                        r"or --overwrite to start again"):
        linear_finetune.main(args + [f"output_dir={killed}", f"pretrained={tmp_path / 'deeplab2' / 'model_final.pth'}"])
    (tmp_path / "three.txt").write_text("img_000\nimg_001\nimg_002\n")
    with pytest.raises(UserError, match=r"it was made with data\.train_list=.*train\.txt \(sha256 [0-9a-f]{12}\), "
                                        r"not .*three\.txt"):
        linear_finetune.main(args + [f"output_dir={killed}", f"data.train_list={tmp_path / 'three.txt'}"])

    assert linear_finetune.main(args + [f"output_dir={killed}"]) == 0
    assert_same_weights(tmp_path / "straight" / "probe_final.pth", killed / "probe_final.pth")
    assert records(killed / "metrics.jsonl") == records(tmp_path / "straight" / "metrics.jsonl")
    assert [r["iteration"] for r in records(killed / "metrics.jsonl")] == [1, 2, 3, 4]
    result = (killed / "results.json").read_text()
    assert json.loads(result)["pretrained"] == str(tmp_path / "deeplab" / "model_final.pth")
    with pytest.raises(UserError, match=r"output .*killed/results\.json already exists; pass --overwrite to replace it"):
        linear_finetune.main(args + [f"output_dir={killed}"])
    assert (killed / "results.json").read_text() == result


def test_probe_prunes_checkpoints_and_evaluates_a_saved_probe_alone(synthetic_probe):
    tmp_path, args = synthetic_probe
    out = tmp_path / "probe"
    assert linear_finetune.main(args + [f"output_dir={out}"]) == 0
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "probe_final.pth"]
    trained = json.loads((out / "results.json").read_text())
    # The probe checkpoint holds the whole network: no `pretrained` is needed to evaluate it.
    (out / "results.json").unlink()
    assert linear_finetune.main(args + [f"output_dir={out}", "pretrained=null",
                                        "--model_path", str(out / "probe_final.pth")]) == 0
    assert json.loads((out / "results.json").read_text())["confusion"] == trained["confusion"]


def test_pooled_crf_evaluation_matches_the_in_process_one(synthetic_probe):
    from segmentation.engine import evaluate, load_trained_model
    from segmentation.probe import build_probe_val_dataset, crf_postprocessor, evaluate_with_crf

    tmp_path, args = synthetic_probe
    config = load_config(tmp_path / "probe_exp.yml", args[3:], defaults=PROBE_SCHEMA)
    model = load_trained_model(config, tmp_path / "deeplab" / "model_final.pth", torch.device("cpu"))
    val = build_probe_val_dataset(config)
    serial = evaluate(model, val, config, DistInfo(), crf_postprocessor(val))
    pooled = evaluate_with_crf(model, val, config, DistInfo(), workers=2, chunk=3)  # chunks of 3 + 1
    assert pooled["confusion"] == serial["confusion"]
    assert sum(map(sum, pooled["confusion"])) == 4 * 64 * 64
