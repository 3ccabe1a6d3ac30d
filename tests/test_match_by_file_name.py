"""Evaluators match predictions to the GT by file_name when both files name their images (issue 10 point 2):
a GT numbering its images 1..N, masks numbered by their COCO file names, and only some images predicted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import eval_corloc
import eval_instances
from tests.cli_helpers import error_line, run_main
from utils.coco_io import make_annotation

SIZE = (40, 60)  # h, w of every image
# The GT numbers its images 1..N in its own order; the files are named by their COCO ids.
GT_NAMES = ["000000000009.jpg", "000000000004.jpg", "000000000001.jpg", "000000000003.jpg", "000000000002.jpg"]
GT_BOXES = [[2, 2, 20, 20], [30, 10, 25, 25], [5, 20, 15, 15], [10, 5, 40, 30], [0, 0, 30, 40]]


def box_mask(box, size=SIZE) -> np.ndarray:
    mask = np.zeros(size, dtype=np.uint8)
    x, y, w, h = box
    mask[y:y + h, x:x + w] = 1
    return mask


def write_gt(path: Path, names=GT_NAMES, size=SIZE) -> Path:
    images = [{"id": i + 1, "file_name": f"val2017/{n}", "height": size[0], "width": size[1]}
              for i, n in enumerate(names)]
    anns = [{**make_annotation(box_mask(b), i + 1), "id": i + 1, "category_id": 1}
            for i, b in enumerate(GT_BOXES[:len(names)])]
    for a in anns:
        del a["score"]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))
    return path


def write_masks(path: Path, predicted: dict[str, list], size=SIZE) -> Path:
    """A gen_masks.py output (--image_ids auto: ids from the file names) for some of the images: name -> box."""
    images, anns = [], []
    for name, box in predicted.items():
        image_id = int(Path(name).stem)
        images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        anns.append({**make_annotation(box_mask(box, size), image_id, 1, 0.9), "id": len(anns) + 1})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))
    return path


def newcomer_masks(tmp_path: Path) -> Path:
    """Masks of the first 3 files in sorted order (--max_images 3): each exactly its image's GT object, except
    000000000003.jpg, which misses."""
    index = {n: i for i, n in enumerate(GT_NAMES)}
    return write_masks(tmp_path / "masks.json", {
        "000000000001.jpg": GT_BOXES[index["000000000001.jpg"]],
        "000000000002.jpg": GT_BOXES[index["000000000002.jpg"]],
        "000000000003.jpg": [40, 30, 5, 5],
    })


def test_corloc_matches_by_file_name_and_scores_only_the_predicted_images(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    masks = newcomer_masks(tmp_path)
    out = tmp_path / "corloc.json"
    code, stdout, err = run_main(eval_corloc.main, ["--input_file", str(masks), "--gt_file", str(gt),
                                                    "--out_json", str(out)])
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[-1] == "CorLoc: 66.67"
    assert lines[-3] == "CorLoc 66.67 % over 3 of 5 GT images (matched by file_name)"
    saved = json.loads(out.read_text())
    # GT ids: 000000000001.jpg is image 3, 000000000002.jpg image 5, 000000000003.jpg image 4
    assert saved["per_image"] == {"3": True, "5": True, "4": False} and saved["matched_by"] == "file_name"


def test_instances_match_by_file_name_and_evaluate_only_the_predicted_images(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    masks = newcomer_masks(tmp_path)
    code, stdout, err = run_main(eval_instances.main, ["--input_file", str(masks), "--gt_file", str(gt),
                                                       "--class_agnostic"])
    assert code == 0, err
    assert "note: scored over 3 of 5 GT images (matched by file_name)" in stdout
    assert "evaluated 3 predictions against 3 objects in 3 images" in stdout
    # Equal scores keep GT image order (ids 3, 4, 5): hit, miss, hit. Precision 1 up to recall 1/3 (34 of the
    # 101 recall points), then 2/3 up to recall 2/3 (33 points): AP50 = (34 + 33 * 2/3) / 101 = 55.45 %.
    assert stdout.strip().splitlines()[-1] == "segm AP50: 55.45"


def test_a_predicted_image_missing_from_the_gt_or_of_another_size_is_refused(tmp_path):
    gt = write_gt(tmp_path / "gt.json")
    masks = write_masks(tmp_path / "masks.json", {"000000000001.jpg": [0, 0, 5, 5], "000000000077.jpg": [0, 0, 5, 5]})
    for main in (eval_corloc.main, eval_instances.main):
        code, _, err = run_main(main, ["--input_file", str(masks), "--gt_file", str(gt)])
        assert code == 2
        assert error_line(err) == (f"error: {masks}: image '000000000077.jpg' (id 77) is not in {gt} (matched by "
                                   f"file_name); pass the --gt_file the predictions were made for, or make them with "
                                   f"gen_masks.py --gt_json {gt}")
    other_size = write_masks(tmp_path / "big.json", {"000000000001.jpg": [0, 0, 5, 5]}, size=(80, 60))
    code, _, err = run_main(eval_corloc.main, ["--input_file", str(other_size), "--gt_file", str(gt)])
    assert code == 2
    assert error_line(err) == (f"error: {other_size}: image '000000000001.jpg' is 80x60 (h x w) but 40x60 in {gt}: "
                               "not the same image; pass the --gt_file the predictions were made for")


def test_a_results_list_whose_ids_are_not_the_gts_says_which_file_to_pass(tmp_path):
    """A results list names no files: against a GT numbering its images 1..5, ids taken from the file names
    (77 here) cannot be matched, and the one error line says to pass the dataset the results were made for."""
    gt = write_gt(tmp_path / "gt.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps([make_annotation(box_mask([0, 0, 5, 5]), 77, 1, 0.9)]))
    hint = (" (a results list names no files, so its ids must be the GT's: pass the COCO dataset the predictions "
            "were made for, e.g. train_net.py's --test_json, or a predictions file with 'images' to match by "
            "file_name)")
    code, _, err = run_main(eval_instances.main, ["--input_file", str(results), "--gt_file", str(gt)])
    assert code == 2
    assert error_line(err) == f"error: {results}: annotation #0 has image_id 77 which is not in {gt}{hint}"
    code, _, err = run_main(eval_corloc.main, ["--input_file", str(results), "--gt_file", str(gt)])
    assert code == 2 and error_line(err) == (f"error: {results}: annotation #0 has image_id 77 which is not in the "
                                             f"ground truth {gt}{hint}")
    # A COCO dict naming its images is matched by name instead: no such advice.
    masks = write_masks(tmp_path / "masks.json", {"000000000001.jpg": [0, 0, 5, 5]})
    code, _, err = run_main(eval_instances.main, ["--input_file", str(masks), "--gt_file", str(gt)])
    assert code == 0, err
