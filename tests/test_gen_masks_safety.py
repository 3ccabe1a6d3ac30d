"""gen_masks.py: corrupt parts refused at merge, concurrent runs refused, refused runs leave nothing behind,
list files, ids taken from a GT by file name, --exclude and the label-mask warning (issues 9 and 10)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gen_masks
from distill.data import folder_entries
from distill.generate import PartLock, part_path, scan_part
from tests import cli_helpers
from utils.errors import UserError

FAST = ["--weights", "random", "--num_workers", "0", "--post_workers", "0", "--resize", "0", "--batch_size", "1"]


def gen(*args):
    """`python gen_masks.py ARGS` in this process: (exit code, stdout, stderr)."""
    return cli_helpers.run_main(gen_masks.main, [*map(str, args)])


def refused(*args) -> str:
    code, _, err = gen(*args)
    assert code == 2, err
    return cli_helpers.error_line(err)


def save_noise(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def three_images(tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        save_noise(root / f"img{i}.png", 32, 48, i)
    return root


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- merge checks every record


def test_merge_refuses_a_corrupt_or_short_shard_naming_file_and_line(three_images, tmp_path):
    out = tmp_path / "out" / "masks.json"
    for shard in ("0/2", "1/2"):
        assert gen("--dataset", "folder", "--dataset_root", three_images, "--pred_json_path", out, "--shard", shard,
                   *FAST)[0] == 0
    shard0 = part_path(out, 0, 2)  # batches of one image: images 0 and 2
    lines = shard0.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["planned_images"] == 2
    original = shard0.read_text()

    shard0.write_text("\n".join([lines[0], lines[1][:40] + "#garbage", lines[2]]) + "\n")
    line = refused("--merge", "--pred_json_path", out)
    assert line == f"error: {shard0}: line 2: not valid JSON; the part is corrupt: rerun its shard with --overwrite"
    assert not out.exists()

    shard0.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a record lost: valid lines, one too few
    line = refused("--merge", "--pred_json_path", out)
    assert line == (f"error: {shard0} holds 1 image records but its shard planned 2; rerun its shard with "
                    "--overwrite")
    assert not out.exists()

    shard0.write_text(original)
    code, stdout, err = gen("--merge", "--pred_json_path", out)
    assert code == 0, err
    assert "3 images" in stdout and len(json.loads(out.read_text())["images"]) == 3


def test_an_unfinished_part_may_only_have_its_last_line_torn(tmp_path):
    header = json.dumps({"kind": "header", "settings": {"method": "lost"}, "planned_images": 3})
    record = json.dumps({"index": 0, "image": {"id": 1}, "annotations": []})
    part = tmp_path / "shard-00000-of-00001.jsonl.inprogress"
    part.write_text(f"{header}\n{record}\n" + '{"index": 1, "ima')  # killed while writing image 1
    scan = scan_part(part, finished=False)
    assert [index for index, _ in scan.offsets] == [0] and scan.good_end == len(f"{header}\n{record}\n")
    with pytest.raises(UserError, match=r"line 3: not valid JSON; the part is corrupt"):
        scan_part(part, finished=True)
    part.write_text(f"{header}\n" + '{"index": 1, "ima\n' + f"{record}\n")  # not the last line: corrupt
    with pytest.raises(UserError, match=r"inprogress: line 2: not valid JSON; the part is corrupt"):
        scan_part(part, finished=False)
    part.write_text(f"{header}\n" + '{"image": {}, "annotations": []}\n' + f"{record}\n")
    with pytest.raises(UserError, match=r"line 2: no image .index.; the part is corrupt"):
        scan_part(part, finished=False)


# ----------------------------------------------------------------------------- one writer per part


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(three_images, tmp_path):
    out = tmp_path / "masks.json"
    args = ["--dataset", "folder", "--dataset_root", three_images, "--pred_json_path", out, *FAST]
    with PartLock(part_path(out, 0, 1)):  # the first run, as another process would hold it
        for extra in ([], ["--overwrite"], ["--resume"]):
            line = refused(*args, *extra)
            assert line.startswith(f"error: another run is writing {part_path(out, 0, 1)} (pid {os.getpid()} on ")
            assert line.endswith("wait for it to finish or stop it, then run again")
    assert files_under(tmp_path / "masks.json.parts") == ["shard-00000-of-00001.jsonl.lock"]  # no part written
    code, _, err = gen(*args)
    assert code == 0, err
    assert len(json.loads(out.read_text())["images"]) == 3


# ----------------------------------------------------------------------------- refused runs leave nothing


def test_refused_runs_leave_nothing_and_the_next_run_starts_clean(three_images, tmp_path):
    out = tmp_path / "out" / "masks.json"
    args = ["--dataset", "folder", "--dataset_root", three_images, "--pred_json_path", out, *FAST]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    refusals = [
        ([*args, "--weights", tmp_path / "missing.pth"], "--weights checkpoint not found"),
        ([*args, "--weights", tmp_path / "bad.pth"], "cannot read --weights checkpoint"),
        ([*args, "--vis_dir", tmp_path / "a_file" / "vis"], "cannot write --vis_dir"),
        (["--dataset", "folder", "--dataset_root", tmp_path / "empty", "--pred_json_path", out, *FAST],
         "no images found under"),
        ([*args, "--gt_json", tmp_path / "missing_gt.json"], "COCO dataset not found"),
        ([*args, "--topk", "0.5", "--method", "lost"], "--topk"),
    ]
    for argv, message in refusals:
        assert message in refused(*argv)
        assert not (tmp_path / "out").exists(), argv
    folder_out = tmp_path / "folder.json"
    folder_out.mkdir()
    assert refused(*args[:-len(FAST)][:4], "--pred_json_path", folder_out, "--overwrite", *FAST) == \
        f"error: output {folder_out} is a folder, not a file"

    code, _, err = gen(*args)
    assert code == 0 and "unfinished" not in err and "made with" not in err, err


def test_a_run_stopped_before_its_first_image_does_not_block_the_next(three_images, tmp_path, monkeypatch):
    import distill.engine as engine_module

    out = tmp_path / "masks.json"
    args = ["--dataset", "folder", "--dataset_root", three_images, "--pred_json_path", out, *FAST]

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "backbone_features", stop)
    code, _, _ = gen(*args, "--method", "lost")
    assert code == 130
    monkeypatch.undo()
    code, _, err = gen(*args)  # other settings, no --resume: the header-only part is simply replaced
    assert code == 0, err
    assert json.loads(out.read_text())["info"]["settings"]["method"] == "maskdistill"


def test_coco20k_refused_for_its_weights_writes_no_subset_gt(tiny_coco, tmp_path):
    file_list = tmp_path / "list.txt"
    file_list.write_text(sorted(p.name for p in (tiny_coco / "val2017").glob("*.jpg"))[0] + "\n")
    out = tmp_path / "out" / "masks.json"
    line = refused("--dataset", "COCO20k", "--dataset_root", tiny_coco / "val2017", "--coco_json",
                   tiny_coco / "annotations" / "instances_val2017.json", "--file_list", file_list,
                   "--pred_json_path", out, "--weights", tmp_path / "missing.pth")
    assert "--weights checkpoint not found" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- list files


def test_list_files_that_are_not_text_are_one_clear_error(voc_mini, tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "odd.txt").write_bytes(b"2011_000003\n\xff\xfe_name\n")
    line = refused("--dataset", "VOCClass", "--dataset_root", tmp_path / "VOCdevkit", "--set", "odd",
                   "--pred_json_path", tmp_path / "m.json", *FAST)
    assert line == "error: VOC image name '\\udcff\\udcfe_name' is not of the form YYYY_NNNNNN; cannot derive an image id"

    binary = tmp_path / "list.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    line = refused("--dataset", "COCO20k", "--dataset_root", voc_mini, "--coco_json", gt,
                   "--file_list", binary, "--pred_json_path", tmp_path / "m.json", *FAST)
    assert line == (f"error: COCO20k file list {binary} is not a text file (it holds NUL bytes); expected one name "
                    "per line")


# ----------------------------------------------------------------------------- ids from a GT by file name


def coco_folder(tmp_path: Path, stems: list[str]) -> Path:
    root = tmp_path / "coco"
    for i, stem in enumerate(stems):
        save_noise(root / f"{stem}.jpg", 30, 40, i)
    return root


def gt_numbered_1_to_n(path: Path, names: list[str], size=(30, 40)) -> None:
    images = [{"id": i + 1, "file_name": name, "height": size[0], "width": size[1]} for i, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))


def test_gt_json_takes_ids_by_file_name(tmp_path):
    root = coco_folder(tmp_path, ["000000000009", "000000000025", "000000000030"])
    gt = tmp_path / "gt.json"
    # the GT numbers its images 1..N, in another order, with paths under a split folder
    gt_numbered_1_to_n(gt, ["val2017/000000000030.jpg", "val2017/000000000009.jpg", "val2017/000000000025.jpg"])
    entries = folder_entries(root, f"from:{gt}")
    assert [(e.file_name, e.image_id) for e in entries] == [("000000000009.jpg", 2), ("000000000025.jpg", 3),
                                                            ("000000000030.jpg", 1)]
    out = tmp_path / "masks.json"
    code, _, err = gen("--dataset", "folder", "--dataset_root", root, "--gt_json", gt, "--pred_json_path", out, *FAST)
    assert code == 0, err
    images = json.loads(out.read_text())["images"]
    assert [(img["file_name"], img["id"]) for img in images] == [("000000000009.jpg", 2), ("000000000025.jpg", 3),
                                                                 ("000000000030.jpg", 1)]


def test_gt_json_missing_images_are_an_error_unless_skipped(tmp_path):
    root = coco_folder(tmp_path, ["000000000009", "000000000025", "000000000030", "000000000034", "000000000036"])
    gt = tmp_path / "gt.json"
    gt_numbered_1_to_n(gt, ["000000000025.jpg"])
    line = refused("--dataset", "folder", "--dataset_root", root, "--gt_json", gt, "--pred_json_path",
                   tmp_path / "m.json", *FAST)
    assert line == (f"error: 4 of 5 images under {root} are not in {gt} by file_name (000000000009.jpg, "
                    "000000000030.jpg, 000000000034.jpg, ...); pass --skip_images_not_in_gt to leave them out, "
                    "or --exclude GLOB")
    entries = folder_entries(root, f"from:{gt}", skip_images_not_in_gt=True)
    assert [(e.index, e.file_name, e.image_id) for e in entries] == [(0, "000000000025.jpg", 1)]


# ----------------------------------------------------------------------------- --exclude, label masks


@pytest.fixture
def horses(tmp_path):
    """A folder as the newcomer's: photos in images/ and their palette label PNGs in masks/."""
    root = tmp_path / "horses"
    for i in range(3):
        save_noise(root / "images" / f"horse{i:03d}.jpg", 30, 40, i)
        label = Image.fromarray((np.arange(30 * 40).reshape(30, 40) % 2).astype(np.uint8), mode="P")
        (root / "masks").mkdir(parents=True, exist_ok=True)
        label.save(root / "masks" / f"horse{i:03d}.png")
    return root


def test_label_masks_among_photos_are_warned_about_and_exclude_leaves_them_out(horses, capsys):
    entries = folder_entries(horses)
    assert len(entries) == 6
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {horses} may mix photos with label masks (3 single-channel PNG(s) in label-like "
                        "folders, e.g. masks/horse000.png; 3 name(s) in two folders, e.g. images/horse000.jpg and "
                        "masks/horse000.png); every image found is processed: pass --exclude 'masks' to leave them "
                        "out"]
    for patterns in (["masks"], ["masks/*"], ["*.png"]):
        entries = folder_entries(horses, exclude=patterns)
        assert [e.file_name for e in entries] == ["images/horse000.jpg", "images/horse001.jpg", "images/horse002.jpg"]
        assert [e.image_id for e in entries] == [1, 2, 3]
        assert "warning" not in capsys.readouterr().err


def test_exclude_on_the_command_line(horses, tmp_path):
    out = tmp_path / "m.json"
    code, _, err = gen("--dataset", "folder", "--dataset_root", horses, "--exclude", "masks", "--pred_json_path", out,
                       *FAST)
    assert code == 0, err
    assert "warning: " not in err.replace("WARNING: --weights random", "")
    data = json.loads(out.read_text())
    assert [img["file_name"] for img in data["images"]] == ["images/horse000.jpg", "images/horse001.jpg",
                                                            "images/horse002.jpg"]
    assert data["info"]["settings"]["exclude"] == ["masks"]
    assert "applies to --dataset folder" in refused("--dataset", "VOCClass", "--dataset_root", horses, "--exclude",
                                                    "masks", "--pred_json_path", out, "--overwrite", *FAST)


# ----------------------------------------------------------------------------- polygons


@pytest.mark.parametrize("thin", ["column", "row", "pixel"])
def test_masks_too_thin_for_a_polygon_are_written_as_rle(thin, tmp_path):
    from pycocotools.coco import COCO

    from utils.coco_io import decode_segmentation, make_annotation

    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[2:12, 2:14] = 1  # a blob that a polygon describes
    if thin == "column":
        mask[3:17, 25] = 1
    elif thin == "row":
        mask[18, 5:25] = 1
    else:
        mask[16, 27] = 1
    ann = make_annotation(mask, 7, mask_format="polygon")
    assert isinstance(ann["segmentation"], dict)  # RLE: nothing of the mask is lost
    np.testing.assert_array_equal(decode_segmentation(ann["segmentation"], 20, 30), mask)

    blob = np.zeros((20, 30), dtype=np.uint8)
    blob[2:12, 2:14] = 1
    polygon_ann = make_annotation(blob, 7, mask_format="polygon")
    assert isinstance(polygon_ann["segmentation"], list) and all(len(p) >= 6 for p in polygon_ann["segmentation"])

    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 7, "height": 20, "width": 30, "file_name": "a.png"}],
                              "annotations": [], "categories": [{"id": 1, "name": "object"}]}))
    results = COCO(str(gt)).loadRes([{**ann, "id": 1}, {**polygon_ann, "id": 2}])
    assert results.annToMask(results.anns[1]).sum() == mask.sum()
    assert results.annToMask(results.anns[2]).sum() > 0
