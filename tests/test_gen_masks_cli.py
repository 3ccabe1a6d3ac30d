"""gen_masks.py end to end: real images, bad images, shard + merge, resume, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import distill.engine as engine_module
import gen_masks
from distill.data import Geometry, resized_size, upsample_patch_mask
from tests import cli_helpers
from tests.helpers.ports import free_port
from utils.coco_io import decode_segmentation, mask_to_bbox

REPO = Path(__file__).resolve().parents[1]
FAST = ["--weights", "random", "--num_workers", "0", "--precision", "fp32"]
# The README's first gen_masks command, word for word (tests/test_docs_commands.py checks that the README still
# says it); run from the repository root, so masks.json is put in tmp_path.
README_GEN_MASKS = ("python gen_masks.py --dataset folder --dataset_root ../shared/data/tiny_coco/val2017 "
                    "--weights random --pred_json_path masks.json")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "gen_masks.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


def run_inprocess(*args):
    parser = gen_masks.build_parser()
    return engine_module.generate_masks(engine_module.gen_masks_from_args(parser.parse_args([*map(str, args)])))


def run_main(*args) -> subprocess.CompletedProcess:
    """`python gen_masks.py ARGS` in this process, through its real entry point (`run_cli(main)`): the exit
    code and the output, without a second interpreter's seconds of torch import."""
    argv = [*map(str, args)]
    code, out, err = cli_helpers.run_main(gen_masks.main, argv)
    return subprocess.CompletedProcess(["gen_masks.py", *argv], code, out, err)


def run_main_expecting_error(argv, capsys) -> str:
    """`python gen_masks.py ARGV` in this process, refused: exit 2 and its one `error:` line."""
    code, _, err = cli_helpers.run_main(gen_masks.main, [*map(str, argv)])
    assert code == 2, err
    return cli_helpers.error_line(err)


def check_masks_file(path: Path, root: Path, one_per_image: bool = True) -> dict:
    data = json.loads(path.read_text())
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    images = {img["id"]: img for img in data["images"]}
    if one_per_image:
        assert len(data["annotations"]) == len(images)
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        assert (root / img["file_name"]).is_file()
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
        assert mask.shape == (img["height"], img["width"]) and mask.any()
        assert ann["bbox"] == mask_to_bbox(mask) and ann["area"] == mask.sum()
        assert 0.0 <= ann["score"] <= 1.0
    return data


@pytest.fixture
def small_folder(tmp_path):
    """Six noise images of assorted sizes (several padded sizes, so batches are grouped)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(40, 60), (60, 40), (48, 48), (40, 60), (33, 70), (48, 48)]
    for i, (h, w) in enumerate(sizes):
        folder = root / "sub" if i % 2 else root
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return root


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("height,width,resize,max_size",
                         [(480, 640, 640, 2048), (640, 427, 640, 2048), (100, 4000, 640, 2048), (5, 5, 640, 2048),
                          (333, 500, 224, 1000), (1, 300, 640, 2048)])
def test_resized_size_matches_torchvision_resize(height, width, resize, max_size):
    img = Image.new("RGB", (width, height))
    out = TF.resize(img, resize, max_size=max_size, antialias=True)
    assert resized_size(height, width, resize, max_size) == (out.height, out.width)


def test_mask_upsampling_is_nearest_patch_upsample_crop_and_resize():
    rng = np.random.default_rng(1)
    patch_mask = rng.random((5, 7)) > 0.5
    resized, original = (70, 100), (97, 141)
    full = np.kron(patch_mask, np.ones((16, 16), dtype=np.uint8))[: resized[0], : resized[1]]
    expected = np.asarray(Image.fromarray(full * 255).resize(original[::-1], Image.NEAREST)) > 0
    geometry = Geometry(original=original, working=resized, network=(80, 112), patch_size=16, stretched=False)
    np.testing.assert_array_equal(upsample_patch_mask(patch_mask, geometry), expected)


def test_help_explains_every_flag():
    for action in gen_masks.build_parser()._actions:
        assert action.help, action.option_strings


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_voc_mini_end_to_end(voc_mini, tmp_path):
    out = tmp_path / "voc.json"
    result = run_cli("--dataset", "VOCClass", "--dataset_root", voc_mini, "--year", "2012", "--set", "trainval",
                     "--resize", 128, "--pred_json_path", out, "--vis_dir", tmp_path / "vis", *FAST)
    assert result.returncode == 0, result.stderr
    data = check_masks_file(out, voc_mini)
    assert sorted(img["id"] for img in data["images"]) == [2011000003, 2011000006, 2011000025]
    assert data["images"][0]["file_name"] == "VOC2012/JPEGImages/2011_000003.jpg"
    assert (tmp_path / "voc.config.yaml").is_file()
    assert len(list((tmp_path / "vis").glob("*.png"))) == 3
    assert "2011_000003" in (tmp_path / "vis" / "index.html").read_text()
    assert not (tmp_path / "voc.json.parts").exists()


@pytest.mark.slow
def test_readme_command_on_tiny_coco_is_accepted_by_loadres(tiny_coco, tmp_path):
    """The README command (with --resize 96 to keep CI fast); its output loads into pycocotools."""
    from pycocotools.coco import COCO

    out = tmp_path / "masks.json"
    result = run_cli(*cli_helpers.documented_argv(README_GEN_MASKS, {"masks.json": str(out)}), "--resize", 96)
    assert result.returncode == 0, result.stderr
    data = check_masks_file(out, tiny_coco / "val2017")
    gt = COCO(str(tiny_coco / "annotations" / "instances_val2017.json"))
    assert {img["id"] for img in data["images"]} == set(gt.getImgIds())
    assert len(gt.loadRes(str(tmp_path / "masks.results.json")).anns) == 50
    assert len(gt.loadRes(data["annotations"]).anns) == 50


# ----------------------------------------------------------------------------- bad input


def test_awkward_and_corrupt_images(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (45, 64), dtype=np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), mode="RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (36, 52), dtype=np.uint16)).save(root / "depth16.png")
    Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(root / "tiny.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 30x80, shown 80x30
    Image.fromarray(rng.integers(0, 255, (30, 80, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    good = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "notes.jpg").write_text("this is not an image")

    out = tmp_path / "masks.json"
    result = run_main("--dataset", "folder", "--dataset_root", root, "--resize", 0, "--pred_json_path", out, *FAST)
    assert result.returncode == 0, result.stderr
    assert "notes.jpg" in result.stderr and "truncated.jpg" in result.stderr
    data = check_masks_file(out, root)
    sizes = {img["file_name"]: (img["height"], img["width"]) for img in data["images"]}
    assert sizes == {"rgb.jpg": (50, 70), "gray.png": (45, 64), "rgba.png": (40, 40), "depth16.png": (36, 52),
                     "tiny.png": (5, 5), "rotated.jpg": (80, 30)}
    skipped = {s["file_name"]: s["reason"] for s in data["skipped_images"]}
    assert set(skipped) == {"truncated.jpg", "notes.jpg"} and all(skipped.values())


@pytest.mark.parametrize("args,message", [
    (["--dataset", "folder", "--dataset_root", "/no/such/folder"], "/no/such/folder"),
    (["--dataset", "VOCClass", "--dataset_root", "/tmp", "--year", "1999"], "VOC1999"),
    (["--dataset", "folder", "--dataset_root", ".", "--shard", "3/2"], "--shard"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, args, message):
    result = run_main(*args, "--pred_json_path", tmp_path / "out.json", *FAST)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_existing_output_needs_overwrite(small_folder, tmp_path):
    out = tmp_path / "masks.json"
    out.write_text("precious")
    result = run_main("--dataset", "folder", "--dataset_root", small_folder, "--resize", 0, "--pred_json_path", out, *FAST)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.read_text() == "precious"


# ----------------------------------------------------------------------------- scale


METHOD_FLAGS = {"maskdistill": ["--resize", 0], "lost": [], "tokencut": [], "maskcut": ["--fixed_size", 32]}


def common_args(root, out, method="maskdistill"):
    return ["--dataset", "folder", "--dataset_root", root, "--pred_json_path", out, "--batch_size", 2,
            "--method", method, *METHOD_FLAGS[method], *FAST]


# One method in the quick tier; the others share the job and run with the slow tests.
@pytest.mark.parametrize("method", ["maskdistill", *(pytest.param(m, marks=pytest.mark.slow)
                                                    for m in ("lost", "tokencut", "maskcut"))])
def test_shard_and_merge_equal_a_single_run(small_folder, tmp_path, method):
    run_inprocess(*common_args(small_folder, tmp_path / "single.json", method))
    sharded = tmp_path / "sharded.json"
    for shard in ("1/3", "0/3", "2/3"):
        run_inprocess(*common_args(small_folder, sharded, method), "--shard", shard)
        assert not sharded.exists()
    assert gen_masks.main(["--merge", "--pred_json_path", str(sharded)]) == 0
    assert sharded.read_bytes() == (tmp_path / "single.json").read_bytes()
    assert (tmp_path / "sharded.results.json").read_bytes() == (tmp_path / "single.results.json").read_bytes()


def test_merge_refuses_missing_shards(small_folder, tmp_path, capsys):
    out = tmp_path / "sharded.json"
    run_inprocess(*common_args(small_folder, out), "--shard", "0/2")
    assert "shard(s) [1] of 2 are not finished" in run_main_expecting_error(["--merge", "--pred_json_path", out], capsys)
    assert not out.exists()


@pytest.mark.parametrize("method", ["maskdistill", "maskcut"])
def test_resume_after_interruption_loses_nothing(small_folder, tmp_path, monkeypatch, capsys, method):
    run_inprocess(*common_args(small_folder, tmp_path / "straight.json", method))
    out = tmp_path / "resumed.json"
    args = common_args(small_folder, out, method)
    real_features = engine_module.backbone_features
    monkeypatch.setattr(engine_module, "backbone_features", cli_helpers.interrupt_on_call(real_features, 3))
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(*args)
    monkeypatch.setattr(engine_module, "backbone_features", real_features)
    assert not out.exists()
    partial = next((tmp_path / "resumed.json.parts").glob("*.inprogress"))
    assert len(partial.read_text().splitlines()) == 1 + 4  # header + two batches of two
    with open(partial, "a") as f:
        f.write('{"index": 5, "image": {"id"')  # a line torn by the kill

    assert "pass --resume to continue" in run_main_expecting_error(args, capsys)
    run_inprocess(*args, "--resume")
    assert out.read_bytes() == (tmp_path / "straight.json").read_bytes()


def test_resume_refuses_changed_settings(small_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "masks.json"
    # after the first batch: the part holds image records
    monkeypatch.setattr(engine_module, "backbone_features",
                        cli_helpers.interrupt_on_call(engine_module.backbone_features, 2))
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(*common_args(small_folder, out))
    assert "topk=0.4, not 0.2" in run_main_expecting_error([*common_args(small_folder, out), "--resume", "--topk", 0.2],
                                                           capsys)
    assert "method=maskdistill, not lost" in run_main_expecting_error(
        [*common_args(small_folder, out, "lost"), "--resume"], capsys)


def test_resume_refuses_weights_rewritten_at_the_same_path(small_folder, tmp_path, monkeypatch, capsys):
    """--weights counts by its content (utils/fingerprint.py): a checkpoint retrained into the same file is a
    changed setting, so the part made with the old one is refused."""
    from utils.vit import build_vit

    weights = tmp_path / "vit.pth"
    state = build_vit("vit_small", 16, "random").vit.state_dict()
    torch.save(state, weights)
    out = tmp_path / "masks.json"
    args = [*common_args(small_folder, out), "--weights", weights]
    monkeypatch.setattr(engine_module, "backbone_features",
                        cli_helpers.interrupt_on_call(engine_module.backbone_features, 2))
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(*args)
    torch.save({**state, "norm.bias": state["norm.bias"] + 1}, weights)  # same path, other weights
    line = run_main_expecting_error([*args, "--resume"], capsys)
    assert f"it was made with weights={weights} (sha256 " in line and line.endswith(
        "; use the same settings, or --overwrite to start again")


@pytest.mark.slow
def test_torchrun_two_processes_equal_a_single_run(small_folder, tmp_path):
    run_inprocess(*common_args(small_folder, tmp_path / "single.json"))
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "gen_masks.py", *map(str, common_args(small_folder, out))],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "single.json").read_bytes()
    assert not (tmp_path / "dist.json.parts").exists()


@pytest.mark.slow
def test_coco20k_subset_gt_and_polygon_output(tiny_coco, tmp_path):
    gt_file = tiny_coco / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_file.read_text())
    chosen = gt["images"][:3]
    file_list = tmp_path / "coco_20k_filenames.txt"
    file_list.write_text("".join(f"val2017/{img['file_name']}\n" for img in chosen))
    out = tmp_path / "coco20k" / "masks.json"
    result = run_cli("--dataset", "COCO20k", "--dataset_root", tiny_coco, "--coco_json", gt_file, "--file_list",
                     file_list, "--resize", 64, "--mask_format", "polygon", "--pred_json_path", out, *FAST)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [img["id"] for img in data["images"]] == [img["id"] for img in chosen]
    assert all(isinstance(a["segmentation"], list) and a["segmentation"] for a in data["annotations"])
    for ann in data["annotations"]:  # polygons trace the same mask: areas agree to within the outline
        img = next(i for i in data["images"] if i["id"] == ann["image_id"])
        assert (tiny_coco / img["file_name"]).is_file()
        polygon_area = decode_segmentation(ann["segmentation"], img["height"], img["width"]).sum()
        assert abs(polygon_area - ann["area"]) <= 0.05 * ann["area"] + 4 * (img["height"] + img["width"])
    subset = json.loads((tmp_path / "coco20k" / "coco20k_gt.json").read_text())
    ids = {img["id"] for img in chosen}
    assert {img["id"] for img in subset["images"]} == ids
    assert len(subset["annotations"]) == sum(a["image_id"] in ids for a in gt["annotations"]) > 0
    agnostic = json.loads((tmp_path / "coco20k" / "coco20k_gt_class_agnostic.json").read_text())
    assert {a["category_id"] for a in agnostic["annotations"]} == {1} and len(agnostic["categories"]) == 1


def test_coco20k_file_list_naming_an_unknown_image_is_one_clear_error(tiny_coco, tmp_path):
    file_list = tmp_path / "list.txt"
    file_list.write_text("val2017/not_in_coco.jpg\n")
    result = run_main("--dataset", "COCO20k", "--dataset_root", tiny_coco, "--coco_json",
                     tiny_coco / "annotations" / "instances_val2017.json", "--file_list", file_list,
                     "--pred_json_path", tmp_path / "m.json", *FAST)
    assert result.returncode == 2 and "not_in_coco.jpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("method,flags", [("lost", ["--resize", 96]), ("tokencut", ["--resize", 96]),
                                          ("maskcut", ["--fixed_size", 96, "--post_workers", 0])])
def test_each_method_on_voc_mini_writes_scored_masks_that_loadres_accepts(voc_mini, tmp_path, method, flags):
    from pycocotools.coco import COCO

    out = tmp_path / "voc.json"
    run_inprocess("--dataset", "VOCClass", "--dataset_root", voc_mini, "--method", method, *flags,
                  "--pred_json_path", out, "--vis_dir", tmp_path / "vis", *FAST)
    data = check_masks_file(out, voc_mini, one_per_image=method != "maskcut")
    assert sorted(img["id"] for img in data["images"]) == [2011000003, 2011000006, 2011000025]
    assert data["info"]["settings"]["method"] == method
    per_image = [sum(a["image_id"] == img["id"] for a in data["annotations"]) for img in data["images"]]
    assert all(1 <= n <= (3 if method == "maskcut" else 1) for n in per_image)
    results = json.loads((tmp_path / "voc.results.json").read_text())
    assert [r["id"] for r in results] == list(range(1, len(data["annotations"]) + 1))
    coco = COCO()
    coco.dataset = {k: data[k] for k in ("images", "annotations", "categories")}
    coco.createIndex()
    assert len(coco.loadRes(str(tmp_path / "voc.results.json")).anns) == len(data["annotations"])
    assert len(list((tmp_path / "vis").glob("*.png"))) == 3


@pytest.mark.parametrize("flags,message", [
    (["--max_images", -1], "argument --max_images: -1 is not >= 0"),
    (["--heads", 0], "argument --heads: 0 is not >= 1"),
    (["--resize", -5], "argument --resize: -5 is not >= 0"),
    (["--max_size", 0], "argument --max_size: 0 is not >= 1"),
    (["--topk", 2], "argument --topk: 2 is not in (0, 1]"),
    (["--topk", "nan"], "argument --topk: 'nan' is not a finite number"),
    (["--num_workers", -1], "argument --num_workers: -1 is not >= 0"),
    (["--post_workers", -1], "argument --post_workers: -1 is not >= 0"),
    (["--batch_size", 0], "argument --batch_size: 0 is not >= 1"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a device"),
    (["--method", "maskcut", "--tau", 1.5], "argument --tau: 1.5 is not in [0, 1)"),
    (["--method", "maskcut", "--num_objects", 0], "argument --num_objects: 0 is not >= 1"),
    (["--method", "lost", "--k_patches", 0], "argument --k_patches: 0 is not >= 1"),
    (["--fixed_size", -1], "argument --fixed_size: -1 is not >= 0"),
    (["--heads", "two"], "argument --heads: 'two' is not an integer"),
    (["--method", "lost", "--tau", 0.3], "--tau applies to --method tokencut or maskcut, not lost"),
    (["--method", "maskdistill", "--num_objects", 2], "--num_objects applies to --method maskcut, not maskdistill"),
    (["--method", "maskcut", "--resize", 320, "--fixed_size", 480], "--resize and --fixed_size exclude each other"),
    (["--method", "maskcut", "--fixed_size", 8], "--fixed_size 8 is smaller than the patch size 16"),
    (["--resize", 3000], "--max_size 2048 must be larger than --resize 3000"),
    (["--weights", "/no/such/weights.pth"], "/no/such/weights.pth"),
])
def test_bad_flags_are_one_error_line_and_leave_no_files(small_folder, tmp_path, capsys, flags, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = run_main_expecting_error(["--dataset", "folder", "--dataset_root", small_folder, "--pred_json_path",
                                     out_dir / "m.json", "--num_workers", 0, *flags], capsys)
    assert message in line
    assert list(out_dir.iterdir()) == []
