"""detectron2_train/train_ggn.sh: the GGN chain end to end in this process (class split, PA predictor,
pseudo-masks grouped from its PA maps, class-agnostic Mask R-CNN on seen-class annotations + pseudo-masks,
open-world AR on the unseen classes) on a few tiny_coco images, and every flag the script passes to a tool
is one that tool takes. The script itself (TINY=1, a few CPU minutes) is run by hand; docs/ggn.md quotes it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import eval_instances
import gen_pa_masks
from detectron2_train import make_split, train_affinity, train_net
from detectron2_train.pseudo_gt import TRAINING_SET, select_pseudo_masks
from utils.coco_io import annotations_by_image, load_coco_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "detectron2_train" / "train_ggn.sh"
TOOLS = {"make_split.py": make_split.parse_args, "train_affinity.py": train_affinity.parse_args,
         "gen_pa_masks.py": gen_pa_masks.build_parser().parse_args, "train_net.py": train_net.parse_args,
         "eval_instances.py": eval_instances.parse_args}


def subset(gt: dict, file_names: list[str]) -> dict:
    images = [i for i in gt["images"] if i["file_name"] in file_names]
    ids = {i["id"] for i in images}
    return {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}


def test_the_script_passes_each_tool_only_flags_it_takes(capsys):
    """The commands of train_ggn.sh (continuation lines joined): each `--flag` is in its tool's --help."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if re.match(r"\s*\$(LAUNCH|PYTHON) ", line)]
    seen = set()
    for command in commands:
        tool = re.search(r"(\w+\.py)", command).group(1)
        flags = set(re.findall(r"(?<![\w-])(--\w+)", command))
        with pytest.raises(SystemExit):
            TOOLS[tool](["--help"])
        help_text = capsys.readouterr().out
        assert flags and all(re.search(rf"{flag}\b", help_text) for flag in flags), (tool, flags)
        seen.add(tool)
    assert seen == set(TOOLS)


def test_ggn_chain_end_to_end_prints_unseen_ar(tiny_coco, tmp_path, capsys, one_thread):
    train = load_coco_dataset(tiny_coco / "annotations" / "instances_train2017.json")
    val = load_coco_dataset(tiny_coco / "annotations" / "instances_val2017.json")
    # The first 2 training images in folder order (pseudo-masks on the first: gen_pa_masks --max_images 1,
    # to keep the test short) and 2 val images.
    train_files = sorted(i["file_name"] for i in train["images"])[:2]
    train_json, val_json = tmp_path / "train.json", tmp_path / "val.json"
    train_json.write_text(json.dumps(subset(train, train_files)))
    val_json.write_text(json.dumps(subset(val, sorted(i["file_name"] for i in val["images"])[:2])))
    splits, pa_masks = tmp_path / "splits", tmp_path / "pa_masks.json"

    make_split.main(["--gt_file", str(train_json), "--split", "voc_to_nonvoc", "--out_dir", str(splits)])
    train_affinity.main(["--config", str(REPO / "configs/affinity/tiny_ggn_voc.yaml"), "--output_dir", str(tmp_path / "pa"),
                         "--train_json", str(train_json), "--train_root", str(tiny_coco / "train2017"),
                         "--seen_classes", str(splits / "A.txt"), "--device", "cpu",
                         "--set", "solver.max_iter=2", "input.min_size_train=[64]", "input.max_size_train=96"])
    gen_pa_masks.main(["--dataset", "folder", "--dataset_root", str(tiny_coco / "train2017"), "--affinity",
                       str(tmp_path / "pa" / "model_final.pth"), "--topk", "20", "--max_images", "1",
                       "--num_workers", "0", "--device", "cpu", "--pred_json_path", str(pa_masks)])
    train_net.main(["--config", str(REPO / "configs/detectron2/tiny_ggn_coco.yaml"), "--output_dir",
                    str(tmp_path / "mask_rcnn"), "--class_agnostic", "--train_json", str(train_json), "--train_root",
                    str(tiny_coco / "train2017"), "--seen_classes", str(splits / "A.txt"), "--pseudo_json",
                    str(pa_masks), "--pseudo_topk", "3", "--test_json", str(val_json), "--test_root",
                    str(tiny_coco / "val2017"), "--no_eval", "--device", "cpu",
                    "--set", "solver.max_iter=1", "solver.ims_per_batch=1"])
    unseen = [line.split()[0] for line in (splits / "B.txt").read_text().splitlines()]
    capsys.readouterr()
    eval_instances.main(["--input_file", str(tmp_path / "mask_rcnn" / "inference" / "results.json"), "--gt_file",
                         str(val_json), "--class_agnostic", "--eval_classes", *unseen, "--max_dets", "10", "20", "50",
                         "100", "--out_json", str(tmp_path / "eval_unseen.json")])
    printed = capsys.readouterr().out

    # The Mask R-CNN trained on the seen classes' annotations plus the best 3 pseudo-masks of each image
    # with IoU < 0.5 to all of them.
    seen_ids = {int(line.split()[0]) for line in (splits / "A.txt").read_text().splitlines()}
    pseudo = load_coco_dataset(pa_masks)
    assert len(pseudo["images"]) == 1 and 0 < len(pseudo["annotations"]) <= 20
    annotated = [a for a in subset(train, train_files)["annotations"] if a["category_id"] in seen_ids]
    by_image = annotations_by_image(annotated)
    pseudo_by_image = annotations_by_image(pseudo["annotations"])
    expected_pseudo = sum(len(select_pseudo_masks(pseudo_by_image.get(i["id"], []), by_image.get(i["id"], []),
                                                  i["height"], i["width"], 3)) for i in pseudo["images"])
    training_set = json.loads((tmp_path / "mask_rcnn" / TRAINING_SET).read_text())
    assert training_set["info"]["pseudo_masks"] == expected_pseudo > 0
    assert len(training_set["annotations"]) == len(annotated) + expected_pseudo
    # The open-world AR@k on the unseen classes is printed and recorded.
    line = next(line for line in printed.splitlines() if "open-world AR" in line and "AR@10 " in line)
    recorded = json.loads((tmp_path / "eval_unseen.json").read_text())
    assert "AR@100" in line and json.dumps(recorded)
