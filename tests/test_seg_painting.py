"""gen_segmentation: instance predictions painted into class maps (overlaps, threshold, fallback, ignore)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from segmentation import gen_segmentation
from segmentation.painting import generate_segmentation, paint_semantic
from tests.cli_helpers import error_line, run_main
from utils.coco_io import make_annotation, read_text_lines
from utils.errors import UserError
from utils.label_png import read_label_png, voc_palette


def _box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _pred(mask, category, score, image_id=1):
    return make_annotation(mask, image_id, category, score)


def test_overlap_most_confident_wins_regardless_of_file_order():
    a = _box_mask(6, 8, 0, 4, 0, 5)   # class 3, score 0.9
    b = _box_mask(6, 8, 2, 6, 3, 8)   # class 7, score 0.6, overlaps a on rows 2-3, cols 3-4
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[2:6, 3:8] = 7
    expected[0:4, 0:5] = 3  # the confident mask is painted last
    for order in ([_pred(a, 3, 0.9), _pred(b, 7, 0.6)], [_pred(b, 7, 0.6), _pred(a, 3, 0.9)]):
        np.testing.assert_array_equal(paint_semantic(order, 6, 8, threshold=0.5), expected)


def test_threshold_drops_low_scores_and_falls_back_to_the_best():
    a = _box_mask(4, 4, 0, 2, 0, 2)
    b = _box_mask(4, 4, 2, 4, 2, 4)
    preds = [_pred(a, 1, 0.8), _pred(b, 2, 0.3)]
    out = paint_semantic(preds, 4, 4, threshold=0.5)
    assert out[0, 0] == 1 and out[3, 3] == 0  # b is below the threshold
    # No prediction passes 0.9: only the single best one (a, 0.8) is kept.
    out = paint_semantic(preds, 4, 4, threshold=0.9)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[0:2, 0:2] = 1
    np.testing.assert_array_equal(out, expected)
    assert not paint_semantic([], 4, 4, threshold=0.5).any()


def test_ignore_uncertain_marks_pixels_covered_only_by_low_scores():
    a = _box_mask(4, 6, 0, 4, 0, 3)   # confident, class 5
    b = _box_mask(4, 6, 0, 4, 2, 6)   # uncertain, overlaps a on column 2
    out = paint_semantic([_pred(a, 5, 0.9), _pred(b, 6, 0.2)], 4, 6, threshold=0.5, ignore_uncertain=True)
    assert (out[:, 0:3] == 5).all()      # the confident mask wins where both cover
    assert (out[:, 3:6] == 255).all()    # covered only by the low-score mask
    out = paint_semantic([_pred(a, 5, 0.9), _pred(b, 6, 0.2)], 4, 6, threshold=0.5)
    assert (out[:, 3:6] == 0).all()


def _write_coco(tmp_path, preds):
    dataset = {"images": [{"id": 1, "file_name": "sub/a.jpg", "height": 6, "width": 8},
                          {"id": 2, "file_name": "b.jpg", "height": 5, "width": 5}],
               "annotations": [], "categories": [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    (tmp_path / "results.json").write_text(json.dumps(preds))
    return tmp_path / "results.json", tmp_path / "dataset.json"


def test_generate_writes_palette_pngs_and_list(tmp_path, capsys):
    a = _box_mask(6, 8, 0, 4, 0, 5)
    results, dataset = _write_coco(tmp_path, [_pred(a, 7, 0.3, image_id=1)])
    stats = generate_segmentation(results, dataset, tmp_path / "out", threshold=0.5)
    assert stats["written"] == 1 and stats["fallback"] == 1 and stats["empty"] == 1 and stats["listed"] == 1
    img = Image.open(tmp_path / "out" / "sub" / "a.png")
    assert img.mode == "P"
    assert np.array(img.getpalette()[:3 * 256]).reshape(256, 3).tolist() == voc_palette().tolist()
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "sub" / "a.png"), a * 7)
    # b has no prediction: not painted all background, not listed, and the warning names it
    assert not (tmp_path / "out" / "b.png").exists()
    assert (tmp_path / "out" / "train.txt").read_text().split() == ["sub/a"]
    assert "warning: 1 of 2 images have no prediction and are left out of" in capsys.readouterr().err
    kept = generate_segmentation(results, dataset, tmp_path / "kept", threshold=0.5, keep_empty=True)
    assert kept["written"] == 2 and not read_label_png(tmp_path / "kept" / "b.png").any()
    assert (tmp_path / "kept" / "train.txt").read_text().split() == ["sub/a", "b"]
    # contiguous ids: 3 -> 1, 7 -> 2
    generate_segmentation(results, dataset, tmp_path / "c", threshold=0.5, class_ids="contiguous")
    assert read_label_png(tmp_path / "c" / "sub" / "a.png").max() == 2


def test_cli_rejects_unknown_image_id_with_one_line(tmp_path):
    a = _box_mask(6, 8, 0, 4, 0, 5)
    results, dataset = _write_coco(tmp_path, [_pred(a, 7, 0.9, image_id=42)])
    code, _, stderr = run_main(gen_segmentation.main, ["--results", str(results), "--dataset", str(dataset),
                                                       "--out_dir", str(tmp_path / "out")])
    assert code == 2 and "image_id 42" in error_line(stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("corrupt, message", [
    # Two images with one id: their predictions would be painted on one of them.
    (lambda d, r: d["images"].append(dict(d["images"][0], file_name="c.jpg")),
     "dataset.json: images[0] and images[2] have the same id 1"),
    # Garbage RLE counts, and counts that do not cover the image: pycocotools raises or decodes garbage.
    (lambda d, r: r[0]["segmentation"].update(counts="garbage!!"),
     "results.json: annotation #0 has RLE counts that are not a valid compressed RLE string ('garbage!!')"),
    (lambda d, r: r[0]["segmentation"].update(counts="5"),
     "results.json: annotation #0 has RLE counts covering 5 pixels, but its size [6, 8] has 48"),
    # A NaN polygon coordinate: pycocotools would exhaust memory or crash the process.
    (lambda d, r: r[0].update(segmentation=[[0, 0, 4, 0, float("nan"), 3]]),
     "results.json: annotation #0 has a polygon with a non-finite or huge coordinate nan"),
    (lambda d, r: r[0].update(segmentation=[[0, 0, 4, 0, 1e9, 3]]),
     "results.json: annotation #0 has a polygon point far outside its 8x6 (w x h) image (id 1)"),
    (lambda d, r: r[0].update(score=float("nan")), "results.json: annotation #0 has a non-finite 'score' nan"),
])
def test_broken_inputs_are_one_error_line_before_any_png(tmp_path, corrupt, message):
    pred = _pred(_box_mask(6, 8, 0, 4, 0, 5), 3, 0.9, image_id=1)
    results, dataset = _write_coco(tmp_path, [pred])
    data, preds = json.loads(dataset.read_text()), json.loads(results.read_text())
    corrupt(data, preds)
    dataset.write_text(json.dumps(data))
    results.write_text(json.dumps(preds))
    code, stdout, stderr = run_main(gen_segmentation.main, ["--results", str(results), "--dataset", str(dataset),
                                                            "--out_dir", str(tmp_path / "out")])
    assert code == 2 and stdout == ""
    assert error_line(stderr).startswith(f"error: {tmp_path}/{message}")
    assert not (tmp_path / "out").exists()


def test_file_names_that_are_not_utf8_are_painted_under_their_own_bytes(tmp_path):
    a = _box_mask(6, 8, 0, 4, 0, 5)
    results, dataset = _write_coco(tmp_path, [_pred(a, 7, 0.9, image_id=1)])
    data = json.loads(dataset.read_text())
    data["images"][0]["file_name"] = "sub/\udcffa.jpg"  # what os.listdir gives for the bytes b"\xffa.jpg"
    dataset.write_text(json.dumps(data))
    code, _, stderr = run_main(gen_segmentation.main, ["--results", str(results), "--dataset", str(dataset),
                                                       "--out_dir", str(tmp_path / "out"), "--keep_empty"])
    assert code == 0, stderr
    assert os.listdir(os.fsencode(tmp_path / "out" / "sub")) == [b"\xffa.png"]
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "sub" / "\udcffa.png"), a * 7)
    assert (tmp_path / "out" / "train.txt").read_bytes() == b"sub/\xffa\nb\n"
    assert read_text_lines(tmp_path / "out" / "train.txt") == ["sub/\udcffa", "b"]  # and back to the same names


def test_rewritten_results_do_not_resume_on_old_pngs(tmp_path):
    a = _box_mask(6, 8, 0, 4, 0, 5)
    results, dataset = _write_coco(tmp_path, [_pred(a, 7, 0.9, image_id=1)])
    generate_segmentation(results, dataset, tmp_path / "out")
    b = _box_mask(5, 5, 0, 2, 0, 2)
    results.write_text(json.dumps([_pred(a, 3, 0.9, image_id=1), _pred(b, 3, 0.8, image_id=2)]))
    with pytest.raises(UserError, match=r"results\.json has changed since .*out was painted from it; pass --overwrite"):
        generate_segmentation(results, dataset, tmp_path / "out")
    assert generate_segmentation(results, dataset, tmp_path / "out", overwrite=True)["written"] == 2
    assert read_label_png(tmp_path / "out" / "sub" / "a.png").max() == 3


def test_bad_mask_size_is_found_before_any_png_is_written(tmp_path):
    good = _pred(_box_mask(6, 8, 0, 4, 0, 5), 3, 0.9, image_id=1)
    bad = _pred(_box_mask(4, 4, 0, 2, 0, 2), 7, 0.9, image_id=2)  # image 2 is 5x5
    results, dataset = _write_coco(tmp_path, [good, bad])
    with pytest.raises(UserError, match=r"results\.json: annotation #1 has an RLE of size \[4, 4\] \(h, w\) but "
                                        r"its image \(id 2\) is 5x5"):
        generate_segmentation(results, dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_file_name_outside_the_output_folder_is_refused(tmp_path):
    results, dataset = _write_coco(tmp_path, [])
    data = json.loads(dataset.read_text())
    data["images"][1]["file_name"] = "../escape.jpg"
    dataset.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"image 2 has file_name '\.\./escape\.jpg'"):
        generate_segmentation(results, dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.png").exists()


def test_resume_with_other_settings_is_refused_unless_overwrite(tmp_path):
    a = _box_mask(6, 8, 0, 4, 0, 5)
    results, dataset = _write_coco(tmp_path, [_pred(a, 7, 0.3, image_id=1)])
    generate_segmentation(results, dataset, tmp_path / "out", threshold=0.5)
    assert generate_segmentation(results, dataset, tmp_path / "out", threshold=0.5)["skipped"] == 1  # b has no prediction: never painted
    with pytest.raises(UserError, match=r"painted with threshold=0\.5, not 0\.2"):
        generate_segmentation(results, dataset, tmp_path / "out", threshold=0.2, ignore_uncertain=True)
    stats = generate_segmentation(results, dataset, tmp_path / "out", threshold=0.2, overwrite=True)
    assert stats["written"] == 1 and stats["fallback"] == 0


def test_labels_are_named_from_the_images_common_folder(tmp_path):
    """VOC's file_name VOC2012/JPEGImages/<id>.jpg gives OUT/<id>.png and the list entry <id>."""
    a = _box_mask(6, 8, 0, 4, 0, 5)
    dataset = {"images": [{"id": 1, "file_name": "VOC2012/JPEGImages/2008_000001.jpg", "height": 6, "width": 8},
                          {"id": 2, "file_name": "VOC2012/JPEGImages/2008_000002.jpg", "height": 6, "width": 8}],
               "annotations": [], "categories": [{"id": 7, "name": "y"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    (tmp_path / "results.json").write_text(json.dumps([_pred(a, 7, 0.9, image_id=1), _pred(a, 7, 0.9, image_id=2)]))
    stats = generate_segmentation(tmp_path / "results.json", tmp_path / "dataset.json", tmp_path / "out")
    assert stats["image_subdir"] == "VOC2012/JPEGImages"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["2008_000001.png", "2008_000002.png"]
    assert (tmp_path / "out" / "train.txt").read_text().split() == ["2008_000001", "2008_000002"]


def test_common_image_folder():
    from segmentation.painting import common_image_folder

    assert common_image_folder(["VOC2012/JPEGImages/a.jpg", "VOC2012/JPEGImages/b.jpg"]) == "VOC2012/JPEGImages"
    assert common_image_folder(["x/a/1.jpg", "x/b/2.jpg"]) == "x"
    assert common_image_folder(["a.jpg", "x/b.jpg"]) == ""
    assert common_image_folder(["x/a.jpg"]) == "x"


def test_no_prediction_at_all_is_refused_before_writing(tmp_path):
    results, dataset = _write_coco(tmp_path, [])
    with pytest.raises(UserError, match="no image of .* has a prediction: nothing to train on"):
        generate_segmentation(results, dataset, tmp_path / "out")
    assert not (tmp_path / "out").exists()
