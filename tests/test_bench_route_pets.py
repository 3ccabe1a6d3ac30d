"""The pets proof's own rules (benchmarks/bench_route_pets.py): the hold-out is every 6th photo in sorted
file-name order, whatever the GT's ids or order; DeepLab's pseudo-classes are read as the breeds that the
clustering's matching gave them, from the two clustering files, never by assuming ids agree."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_route_pets", REPO / "benchmarks" / "bench_route_pets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_sixth_photo_in_file_name_order_is_held_out(bench):
    names = [f"cat_{i}.jpg" for i in range(1, 13)]  # sorted as text: cat_1, cat_10, cat_11, cat_12, cat_2, ...
    gt = {"images": [{"id": 100 - i, "file_name": n} for i, n in enumerate(names)],
          "annotations": [{"id": i, "image_id": 100 - i} for i in range(12)], "categories": []}
    train, held = bench.split(gt, 0)
    order = sorted(names)
    assert [im["file_name"] for im in held["images"]] == [order[5], order[11]] == ["cat_3.jpg", "cat_9.jpg"]
    assert len(train["images"]) == 10 and not {im["id"] for im in train["images"]} & {im["id"] for im in held["images"]}
    assert {a["image_id"] for a in held["annotations"]} == {im["id"] for im in held["images"]}
    train, held = bench.split(gt, 6)  # --limit: the first 6 in that order
    assert [im["file_name"] for im in held["images"]] == ["cat_3.jpg"] and len(train["images"]) == 5


def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_pseudo_classes_take_the_breed_the_matching_gave_their_masks(bench, tmp_path):
    out = tmp_path / "pipeline"
    write(out / "cluster" / "step.json", {"result": {"labelled": "$OUT/cluster/labelled.json"}})
    write(out / "cluster" / "labelled.json", {"annotations": [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 2},
                                                              {"id": 9, "category_id": 1}]})
    write(out / "eval" / "clusters_vs_gt.json", {"annotations": [{"id": 9, "category_id": 30}, {"id": 7, "category_id": 30},
                                                                 {"id": 8, "category_id": 10}]})
    assert bench.breed_of_pseudo_class(out) == {1: 30, 2: 10}
    write(out / "eval" / "clusters_vs_gt.json", {"annotations": [{"id": 9, "category_id": 30}, {"id": 7, "category_id": 10},
                                                                 {"id": 8, "category_id": 10}]})
    with pytest.raises(UserError, match="differ"):  # one cluster, two breeds: not the same K-means
        bench.breed_of_pseudo_class(out)


def test_the_split_folders_refuse_other_photos(bench, tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (source / name).write_bytes(b"x")
    folder = tmp_path / "train"
    bench.link_folder(folder, [{"file_name": "a.jpg"}, {"file_name": "b.jpg"}], source)
    bench.link_folder(folder, [{"file_name": "a.jpg"}, {"file_name": "b.jpg"}], source)  # a rerun keeps them
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "b.jpg"]
    with pytest.raises(UserError, match="other photos"):
        bench.link_folder(folder, [{"file_name": "a.jpg"}], source)
