"""The HTML gallery (utils/gallery.py), its builder from masks files (distill/gallery.py, make_gallery.py) and
gen_masks' --vis_dir files (distill/visualize.py), checked by parsing the page with html.parser."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

import make_gallery
from distill.gallery import build_gallery
from distill.visualize import COLOURS, downsample, draw_layers, flat_name, overlay_name, save_overlay, write_gallery
from tests.cli_helpers import run_main
from utils.coco_io import load_json, make_annotation
from utils.errors import UserError


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []  # nodes and text, in order

    def all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if (tag is None or child.tag == tag) and (cls is None or cls in child.attrs.get("class", "").split()):
                found.append(child)
            found += child.all(tag, cls)
        return found

    def full_text(self) -> str:
        return "".join(c if isinstance(c, str) else c.full_text() for c in self.children)


VOID = {"img", "input", "meta", "br", "link"}


class Tree(HTMLParser):
    """A minimal DOM: nested nodes with attributes and text (script text kept on the script node)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.root = self.current = Node("root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def by_id(tree: Tree, element_id: str) -> Node:
    [node] = [n for n in tree.root.all() if n.attrs.get("id") == element_id]
    return node


# ----------------------------------------------------------------------------- hand-made data

SIZE = (40, 30)  # width, height: below MAX_SIDE, so layers are at full size


def box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), bool)
    mask[y:y + h, x:x + w] = True
    return mask


@pytest.fixture
def dataset(tmp_path):
    """Five images in two folders (two share a stem), two masks files (one with random weights) and a GT."""
    root = tmp_path / "images"
    names = ["horses/images/001.jpg", "horses/images/001.png", "zebras/002.jpg", "zebras/003.jpg", "zebras/004.jpg"]
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(root / name)
    images = [{"id": i + 1, "file_name": n, "width": SIZE[0], "height": SIZE[1]} for i, n in enumerate(names)]
    a = box_mask(2, 3, 10, 8)     # area 80
    b = box_mask(2, 3, 10, 4)     # inside a: IoU(a, b) = 40 / 80 = 0.5
    c = box_mask(20, 10, 10, 10)  # disjoint from a
    lost = [make_annotation(a, 1, score=0.9), make_annotation(c, 1, score=0.25), make_annotation(b, 2, score=0.6),
            make_annotation(c, 3, score=0.1)]
    tokencut = [make_annotation(b, 1, score=0.7), make_annotation(a, 2, score=0.8)]
    gt = [make_annotation(a, 1, category_id=3, ann_id=1), make_annotation(c, 2, category_id=3, ann_id=2)]
    settings = {"method": "lost", "arch": "vit_small", "weights": "random", "k_patches": 100}
    files = {"lost": tmp_path / "lost.json", "tokencut": tmp_path / "tokencut.json", "gt": tmp_path / "gt.json"}
    categories = [{"id": 3, "name": "horse"}]
    files["lost"].write_text(json.dumps({"info": {"settings": settings}, "images": images, "annotations": lost,
                                         "categories": [{"id": 1, "name": "object"}]}))
    files["tokencut"].write_text(json.dumps(tokencut))  # a results list: its images come from lost.json
    files["gt"].write_text(json.dumps({"images": images, "annotations": gt, "categories": categories}))
    return root, files


@pytest.fixture
def page(dataset, tmp_path):
    root, files = dataset
    out = tmp_path / "out"
    path = build_gallery(out, root, [str(files["lost"]), str(files["tokencut"])], gt_json=str(files["gt"]),
                         page_size=2)
    return out, Tree(path.read_text())


def rows(tree: Tree) -> dict[str, Node]:
    return {row.attrs["data-name"]: row for row in tree.root.all("section", "item")}


def caption_lines(panel: Node) -> list[str]:
    return [" ".join(li.full_text().split()) for li in panel.all("li")]


# ----------------------------------------------------------------------------- the page


def test_every_row_has_one_panel_per_column_gt_first(page):
    _, tree = page
    found = rows(tree)
    assert list(found) == ["horses/images/001.jpg", "horses/images/001.png", "zebras/002.jpg", "zebras/003.jpg",
                           "zebras/004.jpg"]
    for row in found.values():
        panels = row.all("figure", "panel")
        assert [p.attrs["data-col"] for p in panels] == ["0", "1", "2"]
        assert [p.all("div", "ph")[0].full_text().split(" · ")[0] for p in panels] == ["GT", "lost", "tokencut"]


def test_captions_give_rank_score_box_area_and_gt_iou(page):
    _, tree = page
    gt, lost, tokencut = rows(tree)["horses/images/001.jpg"].all("figure", "panel")
    assert caption_lines(gt) == ["#1 horse box [2, 3, 10, 8] area 80 px (6.7%)"]
    assert caption_lines(lost) == ["#1 0.900 box [2, 3, 10, 8] area 80 px (6.7%) GT IoU 1.00",
                                   "#2 0.250 box [20, 10, 10, 10] area 100 px (8.3%) GT IoU 0.00"]
    assert caption_lines(tokencut) == ["#1 0.700 box [2, 3, 10, 4] area 40 px (3.3%) GT IoU 0.50"]
    assert " ".join(tokencut.all("div", "ph")[0].full_text().split()) == \
        "tokencut · 1 mask · top 0.700 · GT IoU 0.50 · agree 0.50"


def test_rows_carry_the_numbers_the_page_sorts_and_filters_on(page):
    _, tree = page
    row = rows(tree)["horses/images/001.jpg"].attrs
    assert {k: v for k, v in row.items() if k.startswith("data-")} == {
        "data-name": "horses/images/001.jpg", "data-top-1": "0.900", "data-count-1": "2", "data-iou-1": "1.000",
        "data-agree-1": "", "data-top-2": "0.700", "data-count-2": "1", "data-iou-2": "0.500", "data-agree-2": "0.500"}
    empty = rows(tree)["zebras/004.jpg"].attrs  # no masks in either file: unknowns sort last
    assert (empty["data-top-1"], empty["data-count-1"], empty["data-iou-1"]) == ("", "0", "")
    # image 2's GT is c; lost's only mask there is b (disjoint): IoU 0
    assert rows(tree)["horses/images/001.png"].attrs["data-iou-1"] == "0.000"


def test_sort_filter_and_paging_controls(page):
    _, tree = page
    sort_keys = [o.attrs["value"] for o in by_id(tree, "sort-key").all("option")]
    assert sort_keys == ["name", "top-1", "top-2", "count-1", "count-2", "iou-1", "iou-2", "agree-2"]
    assert [o.attrs["value"] for o in by_id(tree, "filter-key").all("option")] == sort_keys[1:]
    assert [o.attrs["value"] for o in by_id(tree, "sort-dir").all("option")] == ["asc", "desc"]
    assert by_id(tree, "filter-min").attrs["type"] == by_id(tree, "filter-max").attrs["type"] == "number"
    assert by_id(tree, "page-count").full_text() == "3"  # 5 images, 2 a page
    assert [o.attrs["value"] for o in by_id(tree, "page-size").all("option") if "selected" in o.attrs] == ["2"]
    assert [o.attrs["value"] for o in by_id(tree, "view").all("option")] == ["both", "fill", "outline", "image"]
    assert by_id(tree, "opacity").attrs["type"] == "range"


def test_settings_and_random_weights_banners(page):
    _, tree = page
    [banner] = tree.root.all("div", "random-weights")
    assert "RANDOM WEIGHTS" in banner.full_text() and "lost" in banner.all("b")[0].full_text()
    settings = {tr.all("th")[0].full_text(): " ".join(tr.all("td")[0].full_text().split())
                for tr in tree.root.all("table", "settings")[0].all("tr")}
    assert settings["lost"].startswith("method=lost, arch=vit_small, weights=random, k_patches=100")
    assert settings["tokencut"].startswith("no recorded settings")
    assert settings["GT"].startswith("ground truth")


def test_no_random_weights_banner_for_real_weights(dataset, tmp_path):
    root, files = dataset
    data = load_json(files["lost"])
    data["info"]["settings"]["weights"] = "dino"
    files["lost"].write_text(json.dumps(data))
    tree = Tree(build_gallery(tmp_path / "out", root, [str(files["lost"])]).read_text())
    assert tree.root.all("div", "random-weights") == []


def test_page_is_self_contained_and_its_links_resolve(page):
    out, tree = page
    assert not [n for n in tree.root.all() if n.tag in ("script", "link") and ("src" in n.attrs or "href" in n.attrs)]
    links = [n.attrs[key] for n in tree.root.all() for key in ("src", "href") if key in n.attrs]
    assert len(links) == 5 * (1 + 3 * 4)  # per row: the title's link, and per panel its link, thumbnail, 2 layers
    for value in links:
        assert not value.startswith(("http:", "https:", "//", "/")), value
        assert (out / unquote(value)).is_file(), value
    originals = {unquote(n.attrs["href"]) for n in tree.root.all("a") if "href" in n.attrs}
    assert {(out / v).resolve().relative_to((out.parent / "images").resolve()).as_posix() for v in originals} == \
        set(rows(tree))


def test_layers_are_drawn_exactly():
    size = (200, 150)
    first, second = np.zeros((150, 200), bool), np.zeros((150, 200), bool)
    first[30:110, 20:120] = True
    second[100:140, 150:190] = True
    fill, marks = draw_layers(size, 1.0, [first, second], ["0.90", "0.25"], [(60, 70, 75, 85), None])
    assert fill.mode == marks.mode == "P" and fill.info["transparency"] == 0
    fill = np.asarray(fill.convert("RGBA"))
    assert (fill[first] == [*COLOURS[0], 255]).all() and (fill[second] == [*COLOURS[1], 255]).all()
    assert (fill[..., 3] > 0).sum() == first.sum() + second.sum()
    marks = np.asarray(marks.convert("RGBA"))
    outline = (marks == [*COLOURS[0], 255]).all(axis=2)
    # along the left, right and bottom edges (the rank tag covers the top-left corner), never inside
    assert outline[50:110, 20].all() and outline[30:110, 119].all() and outline[109, 20:120].all()
    assert not outline[60:100, 50:110].any()
    seed = (marks == [255, 255, 0, 255]).all(axis=2)
    assert seed[70:86, 75].all() and seed[85, 60:76].all() and seed.sum() == 2 * 16 + 2 * 14
    assert (marks[95, 100] == 0).all()  # transparent inside


def test_masks_are_sampled_at_pixel_centres():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 4:10] = True  # sampled at rows and columns 1, 3, 5, 7, 9
    expected = np.zeros((5, 5), np.uint8)
    expected[1:3, 2:5] = 1
    assert (downsample(mask, (5, 5)) == expected).all()


def test_overlay_names_keep_the_path_readable_and_do_not_collide():
    assert overlay_name("horses/images/001.jpg") == "horses__images__001.jpg.png"
    assert overlay_name("horses/images/001.png") == "horses__images__001.png.png"
    assert flat_name("001.jpg") == "001.jpg"


# ----------------------------------------------------------------------------- gen_masks --vis_dir


def test_vis_dir_gallery_from_save_overlay(tmp_path):
    vis = tmp_path / "vis"
    source = tmp_path / "data" / "horses" / "001.jpg"
    source.parent.mkdir(parents=True)
    Image.new("RGB", SIZE, (90, 90, 90)).save(source)
    image = Image.open(source).convert("RGB")
    save_overlay(image, [box_mask(2, 3, 10, 8)], [0.875], [(2.0, 3.0, 6.0, 7.0)],
                 vis / overlay_name("horses/001.jpg"), file_name="horses/001.jpg", source=source)
    page = write_gallery(vis, {"method": "maskcut", "weights": "random"})
    tree = Tree(page.read_text())
    [row] = tree.root.all("section", "item")
    assert row.attrs["data-name"] == "horses/001.jpg" and row.attrs["data-top-0"] == "0.875"
    [panel] = row.all("figure", "panel")
    assert caption_lines(panel) == ["#1 0.875 box [2, 3, 10, 8] area 80 px (6.7%)"]
    assert len(tree.root.all("div", "random-weights")) == 1
    for value in [n.attrs[k] for n in tree.root.all() for k in ("src", "href") if k in n.attrs]:
        assert (vis / unquote(value)).is_file(), value
    assert sorted(p.name for p in vis.glob("*.png")) == ["horses__001.jpg.png"]


# ----------------------------------------------------------------------------- errors and the command


@pytest.mark.parametrize("change,message", [
    ({"labels": ["one"]}, r"1 label\(s\) for 2 masks file\(s\)"),
    ({"labels": ["x", "x"]}, "labels must be distinct"),
    ({"image_root": "nowhere"}, "is not a folder"),
])
def test_bad_arguments_are_refused_before_writing(dataset, tmp_path, change, message):
    root, files = dataset
    kwargs = {"image_root": root, "masks": [str(files["lost"]), str(files["tokencut"])], **change}
    if change.get("image_root") == "nowhere":
        kwargs["image_root"] = tmp_path / "nowhere"
    with pytest.raises(UserError, match=message):
        build_gallery(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_image_wrong_size_and_conflicting_ids_are_refused(dataset, tmp_path):
    root, files = dataset
    data = load_json(files["lost"])
    data["images"][4]["width"] = 41  # zebras/004.jpg, which has no masks
    files["lost"].write_text(json.dumps(data))
    with pytest.raises(UserError, match="zebras/004.jpg is 40x30, but its masks are for 41x30"):
        build_gallery(tmp_path / "out", root, [str(files["lost"])])
    (root / "zebras" / "003.jpg").unlink()
    with pytest.raises(UserError, match=r"1 image\(s\) not found under .*zebras/003.jpg"):
        build_gallery(tmp_path / "out", root, [str(files["lost"])])
    second = tmp_path / "second.json"
    second.write_text(json.dumps({**data, "images": [{**data["images"][0], "file_name": "other.jpg"}]}))
    with pytest.raises(UserError, match="image id 1 is horses/images/001.jpg in .*lost.json but other.jpg in "):
        build_gallery(tmp_path / "out", root, [str(files["lost"]), str(second)])
    assert not (tmp_path / "out").exists()


def test_gt_column_matches_images_by_file_name_whatever_the_ids(dataset, tmp_path):
    """A GT numbering its images otherwise (100 + reversed order): each row still shows its own image's GT."""
    root, files = dataset
    gt = load_json(files["gt"])
    new_id = {img["id"]: 100 + len(gt["images"]) - k for k, img in enumerate(gt["images"])}
    gt["images"] = [{**img, "id": new_id[img["id"]]} for img in gt["images"]]
    gt["annotations"] = [{**a, "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]
    files["gt"].write_text(json.dumps(gt))
    path = build_gallery(tmp_path / "out", root, [str(files["lost"])], gt_json=str(files["gt"]))
    found = rows(Tree(path.read_text()))
    gt_panel, lost = found["horses/images/001.jpg"].all("figure", "panel")
    assert caption_lines(gt_panel) == ["#1 horse box [2, 3, 10, 8] area 80 px (6.7%)"]
    assert caption_lines(lost)[0].endswith("GT IoU 1.00")
    assert caption_lines(found["horses/images/001.png"].all("figure", "panel")[0]) == [
        "#1 horse box [20, 10, 10, 10] area 100 px (8.3%)"]
    assert all(caption_lines(found[name].all("figure", "panel")[0]) == [] for name in
               ("zebras/002.jpg", "zebras/003.jpg", "zebras/004.jpg"))
    gt["images"][2]["height"] = 31  # zebras/002.jpg: the same file name, another size: not the same image
    files["gt"].write_text(json.dumps(gt))
    with pytest.raises(UserError, match=r"lost.json: image 'zebras/002.jpg' is 30x40 \(h x w\) but 31x40 in .*gt.json: not the same image"):
        build_gallery(tmp_path / "again", root, [str(files["lost"])], gt_json=str(files["gt"]))
    assert not (tmp_path / "again").exists()


def test_a_gt_of_other_images_is_refused(dataset, tmp_path):
    root, files = dataset
    gt = load_json(files["gt"])
    gt["images"][0]["file_name"] = "other.jpg"
    files["gt"].write_text(json.dumps(gt))
    with pytest.raises(UserError, match=r"lost.json: image 'horses/images/001.jpg' \(id 1\) is not in .*gt.json "
                                        r"\(matched by file_name\); pass the --gt_json the predictions were made for"):
        build_gallery(tmp_path / "out", root, [str(files["lost"])], gt_json=str(files["gt"]))
    assert not (tmp_path / "out").exists()


def test_gt_whose_ids_differ_from_the_masks_is_matched_by_file_name(dataset, tmp_path):
    """A GT numbering the same images 1..5 in another order: each image shows its own GT (by file_name), and a
    GT of other images is one error line, with nothing written (it showed "0 masks" before)."""
    root, files = dataset
    gt = load_json(files["gt"])
    new_id = {1: 4, 2: 1, 3: 5, 4: 2, 5: 3}
    gt["images"] = [{**img, "id": new_id[img["id"]]} for img in gt["images"]][::-1]
    gt["annotations"] = [{**a, "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]
    files["gt"].write_text(json.dumps(gt))
    out = tmp_path / "out"
    tree = Tree(build_gallery(out, root, [str(files["lost"])], gt_json=str(files["gt"])).read_text())
    found = rows(tree)
    assert caption_lines(found["horses/images/001.jpg"].all("figure", "panel")[0]) == \
        ["#1 horse box [2, 3, 10, 8] area 80 px (6.7%)"]
    assert caption_lines(found["horses/images/001.png"].all("figure", "panel")[0]) == \
        ["#1 horse box [20, 10, 10, 10] area 100 px (8.3%)"]
    assert caption_lines(found["zebras/002.jpg"].all("figure", "panel")[0]) == []
    assert caption_lines(found["horses/images/001.jpg"].all("figure", "panel")[1])[0].endswith("GT IoU 1.00")

    other = {**gt, "images": [{**img, "file_name": f"elsewhere/{img['id']}.jpg"} for img in gt["images"]]}
    files["gt"].write_text(json.dumps(other))
    code, _, err = run_main(make_gallery.main, ["--images", str(root), "--masks", str(files["lost"]),
                                                "--gt_json", str(files["gt"]), "--out", str(tmp_path / "out2")])
    assert code == 2 and err.strip().splitlines() == [
        f"error: {files['lost']}: image 'horses/images/001.jpg' (id 1) is not in {files['gt']} (matched by file_name); "
        f"pass the --gt_json the predictions were made for, or make them with gen_masks.py --gt_json {files['gt']}"]
    assert not (tmp_path / "out2").exists()


def test_command_writes_once_then_needs_overwrite(dataset, tmp_path, capsys):
    root, files = dataset
    argv = ["--images", str(root), "--masks", str(files["lost"]), "--labels", "LOST (DINO)", "--out",
            str(tmp_path / "out"), "--max_images", "2"]
    assert make_gallery.main(argv) == 0
    tree = Tree((tmp_path / "out" / "index.html").read_text())
    assert list(rows(tree)) == ["horses/images/001.jpg", "horses/images/001.png"]
    assert (tmp_path / "out" / "c1-LOST_DINO" / "horses__images__001.jpg.fill.png").is_file()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        make_gallery.main(argv)
    assert make_gallery.main([*argv, "--overwrite"]) == 0


def test_help_explains_every_flag():
    for action in make_gallery.build_parser()._actions:
        assert action.help, action.option_strings


# ----------------------------------------------------------------------------- in a browser


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium not installed")
def test_page_script_sorts_filters_and_pages_from_the_file_system(page):
    """The page's script, run by headless Chromium on a file:// URL: sorted by lost's top score, high
    first, filtered to scores >= 0.05 (three images pass), 2 a page: page 2 shows the third alone."""
    out, _ = page
    url = (out / "index.html").as_uri() + "#sort-key=top-1&sort-dir=desc&filter-key=top-1&filter-min=0.05&page=2"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60).stdout
    tree = Tree(dom)
    order = [(row.attrs["data-name"], "hidden" in row.attrs) for row in tree.root.all("section", "item")]
    # the images that pass are moved to the end in sorted order; the others stay, hidden, before them
    assert order[-3:] == [("horses/images/001.jpg", True), ("horses/images/001.png", True), ("zebras/002.jpg", False)]
    assert sorted(order[:-3]) == [("zebras/003.jpg", True), ("zebras/004.jpg", True)]
    assert by_id(tree, "page-count").full_text() == "2"
    assert by_id(tree, "shown").full_text() == "images 3-3 of 3 (5 before filtering)"


def test_a_run_without_a_terminal_prints_progress_lines(dataset, tmp_path, monkeypatch, capsys):
    """Not a TTY (a log file): the periodic lines of utils/progress, here one per image, and a last one."""
    root, files = dataset
    monkeypatch.setenv("MASKDISTILL_PROGRESS_SECONDS", "1e-9")
    build_gallery(tmp_path / "out", root, [str(files["lost"])])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gallery: ")]
    assert [line.split(",")[0] for line in lines] == [f"gallery: {n}/5 img ({20 * n}%)" for n in range(1, 6)] + [
        "gallery: 5/5 img (100%)"]
    assert "done in" in lines[-1]
