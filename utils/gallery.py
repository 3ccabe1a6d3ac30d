"""One self-contained HTML page for looking at masks: an `index.html` that opens from the file system
(inline CSS and JS, no CDN, relative links), for any number of images and of mask *columns*
(methods, backbones, runs; the ground truth is one more column).

Every image is one row: its file name (a link to the full-size original) and one panel per column.
A panel stacks transparent layers on the image's thumbnail: `fill` (each mask in its colour, under an
opacity slider) and `marks` (outlines, boxes, seeds, rank tags); the view modes show either or both.
Its caption lists every mask: rank, score (or GT category), box `[x, y, w, h]` and area, with the
column's name. The page sorts and filters the rows by score, mask count, IoU with the GT and
agreement between columns, pages through them (24 a page by default, arrow keys too), and keeps its
state in the URL's `#...` so that a view can be shared. A banner shows each column's settings, and a
red one any column made with random weights.

This module only writes the HTML: the layer images are made by the caller (`distill/visualize.py`
draws them), and given as paths relative to the page's folder, or as `data:` URIs.

    from utils.gallery import Column, GalleryImage, MaskCaption, Panel, write_gallery
    write_gallery(out_dir, images, [Column("maskcut", settings), Column("GT", kind="gt")], title="...")
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from utils.coco_io import write_text

PAGE_SIZES = (12, 24, 48, 96, 192)
# The settings shown in a column's banner line (all of them are in its <details>).
KEY_SETTINGS = ("method", "arch", "patch_size", "weights", "features", "precision", "resize", "fixed_size",
                "num_objects", "tau", "topk", "heads", "k_patches")


@dataclass
class MaskCaption:
    """One mask of a panel, as its caption lists it (pixels of the original image)."""

    bbox: list[float]  # [x, y, w, h]
    area: float
    colour: tuple[int, int, int]
    score: float | None = None  # None for GT masks
    category: str | None = None  # GT: the category name
    gt_iou: float | None = None  # best mask IoU with a (non-crowd) GT mask, when GT is given
    crowd: bool = False


@dataclass
class Panel:
    """One image under one column: its layers (`src` values: relative paths or `data:` URIs) and masks,
    best first. `agreement` is the mask IoU of this column's top mask with the first column's."""

    fill: str | None
    marks: str | None
    masks: list[MaskCaption] = field(default_factory=list)
    agreement: float | None = None

    @property
    def top_score(self) -> float | None:
        scores = [m.score for m in self.masks if m.score is not None]
        return max(scores) if scores else None

    @property
    def top_gt_iou(self) -> float | None:
        """The GT IoU of the best-scored mask (CorLoc's view of the image), None without GT or masks."""
        return self.masks[0].gt_iou if self.masks else None


@dataclass
class GalleryImage:
    """One row: `name` (the file name relative to the image root), its original size, the thumbnail
    `thumb` the layers are drawn for, a link `full` to the original, and its panel per column label
    (a column without a panel for the image says so)."""

    name: str
    width: int
    height: int
    thumb: str
    full: str | None
    panels: dict[str, Panel] = field(default_factory=dict)


@dataclass
class Column:
    """A column of panels: a masks file (`kind="masks"`) or the ground truth (`kind="gt"`), with the
    settings that made it (a masks file's `info.settings`) and where it came from."""

    label: str
    settings: dict | None = None
    source: str | None = None
    kind: str = "masks"

    @property
    def random_weights(self) -> bool:
        return bool(self.settings) and self.settings.get("weights") == "random"


def link(src: str) -> str:
    """A `src`/`href` value: a relative path, URL-quoted (so `#`, `%`, spaces name the file), or a data URI."""
    return src if src.startswith("data:") else quote(src.replace(os.sep, "/"))


def relative_link(target: str | os.PathLike, page_dir: str | os.PathLike) -> str:
    """The relative path from the page's folder to `target` (for links to originals outside it)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())).as_posix()


def _number(value: float | None, digits: int = 3) -> str:
    """A data-attribute value: empty when unknown (the page sorts unknowns last)."""
    return "" if value is None else f"{value:.{digits}f}"


def _metrics(columns: list[Column]) -> list[tuple[str, str]]:
    """(key, label) of every per-row number the page sorts and filters on."""
    mask_columns = [(i, c) for i, c in enumerate(columns) if c.kind == "masks"]
    has_gt = any(c.kind == "gt" for c in columns)
    metrics = []
    for i, c in mask_columns:
        metrics.append((f"top-{i}", f"top score: {c.label}"))
    for i, c in mask_columns:
        metrics.append((f"count-{i}", f"masks: {c.label}"))
    if has_gt:
        for i, c in mask_columns:
            metrics.append((f"iou-{i}", f"GT IoU of top mask: {c.label}"))
    first = mask_columns[0][1].label if mask_columns else ""
    for i, c in mask_columns[1:]:
        metrics.append((f"agree-{i}", f"agreement (top-mask IoU): {c.label} vs {first}"))
    return metrics


def _row_data(image: GalleryImage, columns: list[Column]) -> dict[str, str]:
    data = {"name": image.name}
    for i, column in enumerate(columns):
        if column.kind != "masks":
            continue
        panel = image.panels.get(column.label)
        data[f"top-{i}"] = _number(panel.top_score if panel else None)
        data[f"count-{i}"] = str(len(panel.masks)) if panel else ""
        data[f"iou-{i}"] = _number(panel.top_gt_iou if panel else None)
        data[f"agree-{i}"] = _number(panel.agreement if panel else None)
    return data


def _caption_line(rank: int, mask: MaskCaption, image: GalleryImage) -> str:
    x, y, w, h = (round(v) for v in mask.bbox)
    share = 100.0 * mask.area / max(1, image.width * image.height)
    swatch = "rgb({},{},{})".format(*mask.colour)
    what = f"{mask.score:.3f}" if mask.score is not None else html.escape(mask.category or "object")
    if mask.crowd:
        what += " (crowd)"
    iou = f' <span class="iou">GT IoU {mask.gt_iou:.2f}</span>' if mask.gt_iou is not None else ""
    return (f'<li><span class="sw" style="background:{swatch}"></span><b>#{rank}</b> {what} '
            f'<span class="box">box [{x}, {y}, {w}, {h}]</span> '
            f'<span class="area">area {round(mask.area):,} px ({share:.1f}%)</span>{iou}</li>')


def _panel_html(image: GalleryImage, column: Column, index: int) -> str:
    panel = image.panels.get(column.label)
    label = html.escape(column.label)
    if panel is None:
        return (f'<figure class="panel missing" data-col="{index}"><div class="none">not in {label}</div>'
                f'<figcaption><div class="ph">{label}</div></figcaption></figure>')
    layers = "".join(f'<img class="layer {kind}" src="{html.escape(link(src))}" alt="" loading="lazy">'
                     for kind, src in (("fill", panel.fill), ("marks", panel.marks)) if src)
    base = f'<img class="base" src="{html.escape(link(image.thumb))}" alt="{html.escape(image.name)}" loading="lazy">'
    stack = f'<div class="stack" style="aspect-ratio:{image.width}/{image.height}">{base}{layers}</div>'
    if image.full:
        stack = f'<a href="{html.escape(link(image.full))}" target="_blank" title="full-size image">{stack}</a>'
    count = len(panel.masks)
    head = [f'<span class="method">{label}</span>', f"{count} mask{'s' if count != 1 else ''}"]
    if panel.top_score is not None:
        head.append(f"top {panel.top_score:.3f}")
    if panel.top_gt_iou is not None:
        head.append(f"GT IoU {panel.top_gt_iou:.2f}")
    if panel.agreement is not None:
        head.append(f"agree {panel.agreement:.2f}")
    lines = "".join(_caption_line(rank, mask, image) for rank, mask in enumerate(panel.masks, 1))
    kind = " gt" if column.kind == "gt" else ""
    return (f'<figure class="panel{kind}" data-col="{index}">{stack}<figcaption><div class="ph">'
            f'{" · ".join(head)}</div><ol class="masks">{lines}</ol></figcaption></figure>')


def _row_html(number: int, image: GalleryImage, columns: list[Column]) -> str:
    attributes = " ".join(f'data-{key}="{html.escape(value)}"' for key, value in _row_data(image, columns).items())
    name = html.escape(image.name)
    title = f'<a href="{html.escape(link(image.full))}" target="_blank">{name}</a>' if image.full else name
    panels = "".join(_panel_html(image, column, i) for i, column in enumerate(columns))
    return (f'<section class="item" {attributes}><h3><span class="n">{number}</span> {title} '
            f'<span class="size">{image.width}x{image.height}</span></h3><div class="panels">{panels}</div></section>')


def _banners(columns: list[Column]) -> str:
    parts = []
    for column in columns:
        if column.random_weights:
            parts.append(f'<div class="banner danger random-weights">RANDOM WEIGHTS: the masks of '
                         f'<b>{html.escape(column.label)}</b> were made by a backbone with random weights '
                         f'(--weights random, for smoke tests); they mean nothing.</div>')
    rows = []
    for column in columns:
        settings = column.settings or {}
        key = ", ".join(f"{k}={settings[k]}" for k in KEY_SETTINGS if settings.get(k) is not None)
        source = f' <span class="src">{html.escape(column.source)}</span>' if column.source else ""
        full = ""
        if settings:
            full = (f'<details><summary>all settings</summary><pre>{html.escape(json.dumps(settings, indent=1))}'
                    f'</pre></details>')
        kind = "ground truth" if column.kind == "gt" else (html.escape(key) or "no recorded settings")
        rows.append(f'<tr><th>{html.escape(column.label)}</th><td>{kind}{source}{full}</td></tr>')
    parts.append(f'<table class="banner settings">{"".join(rows)}</table>')
    return "\n".join(parts)


def _controls(columns: list[Column], page_size: int, pages: int) -> str:
    metrics = _metrics(columns)
    options = "".join(f'<option value="{key}">{html.escape(label)}</option>' for key, label in metrics)
    sizes = "".join(f'<option value="{n}"{" selected" if n == page_size else ""}>{n}</option>'
                    for n in sorted({*PAGE_SIZES, page_size}))
    return f"""<div id="controls">
<label>sort <select id="sort-key"><option value="name">file name</option>{options}</select></label>
<select id="sort-dir"><option value="asc">ascending</option><option value="desc">descending</option></select>
<label>filter <select id="filter-key">{options}</select></label>
<label>from <input id="filter-min" type="number" step="0.01" size="5"></label>
<label>to <input id="filter-max" type="number" step="0.01" size="5"></label>
<label>name <input id="filter-name" type="search" size="12" placeholder="contains"></label>
<label>view <select id="view"><option value="both">fill + outlines</option><option value="fill">fill</option>
<option value="outline">outlines</option><option value="image">image only</option></select></label>
<label>opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></label>
<label>size <select id="thumb"><option value="220">S</option><option value="320" selected>M</option>
<option value="480">L</option></select></label>
<label>per page <select id="page-size">{sizes}</select></label>
<span class="pager"><button id="prev" type="button">&larr;</button>
page <input id="page" type="number" min="1" value="1" size="3"> of <span id="page-count">{pages}</span>
<button id="next" type="button">&rarr;</button> <span id="shown"></span></span>
</div>"""


STYLE = """
body{font-family:system-ui,sans-serif;margin:12px;color:#222;--thumb:320px;--alpha:.5}
h1{font-size:20px;margin:4px 0} h3{font-size:14px;margin:10px 0 4px;font-weight:600}
.banner{margin:6px 0;font-size:13px} .danger{background:#c00;color:#fff;font-size:18px;font-weight:700;padding:10px;
border:4px solid #600} table.settings{border-collapse:collapse} table.settings th{text-align:left;padding:2px 8px;
vertical-align:top} table.settings td{padding:2px 8px} .src{color:#777} details{display:inline-block;margin-left:8px}
pre{font-size:11px;max-height:300px;overflow:auto;background:#f4f4f4}
#controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ccc;z-index:5;font-size:13px;
display:flex;flex-wrap:wrap;gap:6px 12px;align-items:center} #controls input[type=number]{width:4.5em} #controls select{max-width:20em}
#items{display:flex;flex-wrap:wrap;gap:4px 24px;align-items:flex-start}
.panels{display:flex;flex-wrap:wrap;gap:10px} .panel{margin:0;width:var(--thumb)}
.panel.gt .ph{color:#060} .stack{position:relative;width:100%;background:#eee}
.stack img{position:absolute;left:0;top:0;width:100%;height:100%;display:block}
.fill{opacity:var(--alpha)} .view-fill .marks,.view-outline .fill,.view-image .layer{display:none}
figcaption{font-size:12px} .ph{font-weight:600;margin:3px 0} .method{color:#036}
ol.masks{list-style:none;padding:0;margin:0;max-height:11em;overflow:auto} ol.masks li{margin-bottom:2px}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #333}
.box,.area{color:#555} .iou{color:#060} .n{color:#999;font-weight:400} .size{color:#999;font-weight:400}
.missing .none{width:100%;aspect-ratio:4/3;background:#f4f4f4;color:#999;display:flex;align-items:center;
justify-content:center} .item[hidden]{display:none}
"""

SCRIPT = """
(function(){
const box=document.getElementById('items');
const items=Array.from(box.querySelectorAll('.item'));
const $=id=>document.getElementById(id);
const fields=['sort-key','sort-dir','filter-key','filter-min','filter-max','filter-name','view','opacity','thumb',
'page-size','page'];
function num(el,key){const v=el.getAttribute('data-'+key);return v===null||v===''?NaN:parseFloat(v);}
function state(){const s={};fields.forEach(f=>{s[f]=$(f).value;});return s;}
function save(){const p=new URLSearchParams(state());history.replaceState(null,'','#'+p.toString());}
function load(){const p=new URLSearchParams(location.hash.slice(1));
fields.forEach(f=>{if(p.has(f))$(f).value=p.get(f);});}
function apply(keepPage){
const key=$('sort-key').value,dir=$('sort-dir').value==='desc'?-1:1;
const fk=$('filter-key').value,lo=parseFloat($('filter-min').value),hi=parseFloat($('filter-max').value);
const text=$('filter-name').value.toLowerCase();
let list=items.filter(el=>{
if(text&&!el.dataset.name.toLowerCase().includes(text))return false;
if(isNaN(lo)&&isNaN(hi))return true;
const v=num(el,fk);if(isNaN(v))return false;
return (isNaN(lo)||v>=lo)&&(isNaN(hi)||v<=hi);});
if(key==='name'){list.sort((a,b)=>dir*a.dataset.name.localeCompare(b.dataset.name));}
else{const k=key;list.sort((a,b)=>{const x=num(a,k),y=num(b,k);
if(isNaN(x)||isNaN(y))return isNaN(x)-isNaN(y);return dir*(x-y)||a.dataset.name.localeCompare(b.dataset.name);});}
const size=parseInt($('page-size').value),pages=Math.max(1,Math.ceil(list.length/size));
let page=Math.min(Math.max(1,parseInt($('page').value)||1),pages);
if(!keepPage)page=1;
$('page').value=page;$('page').max=pages;$('page-count').textContent=pages;
const start=(page-1)*size,visible=new Set(list.slice(start,start+size));
items.forEach(el=>{el.hidden=!visible.has(el);});
list.forEach(el=>box.appendChild(el));
$('shown').textContent=list.length?`images ${start+1}-${Math.min(start+size,list.length)} of ${list.length}`
+(list.length<items.length?` (${items.length} before filtering)`:''):'no image passes the filter';
document.body.className='view-'+$('view').value;
document.body.style.setProperty('--alpha',$('opacity').value);
document.body.style.setProperty('--thumb',$('thumb').value+'px');
save();}
function go(delta){$('page').value=(parseInt($('page').value)||1)+delta;apply(true);window.scrollTo(0,0);}
fields.forEach(f=>$(f).addEventListener(f==='opacity'||f==='filter-name'?'input':'change',
()=>apply(['page','view','opacity','thumb'].includes(f))));
$('prev').addEventListener('click',()=>go(-1));$('next').addEventListener('click',()=>go(1));
document.addEventListener('keydown',e=>{if(e.target.tagName==='INPUT'||e.target.tagName==='SELECT')return;
if(e.key==='ArrowRight')go(1);if(e.key==='ArrowLeft')go(-1);});
load();apply(true);
})();
"""


def gallery_html(images: list[GalleryImage], columns: list[Column], title: str = "Masks",
                 page_size: int = 24, notes: str = "") -> str:
    """The page as a string (see `write_gallery`)."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    labels = [c.label for c in columns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"column labels must be distinct: {labels}")
    pages = max(1, math.ceil(len(images) / page_size))
    rows = "\n".join(_row_html(n, image, columns) for n, image in enumerate(images, 1))
    legend = ("Each mask in its own colour, ranked by score (#1 first); outlines and boxes in the same colour, "
              "the patch that seeded a mask in yellow. GT masks are drawn the same way, in category order. "
              "Click an image for the full-size original; the arrow keys turn pages; the view is kept in the URL.")
    notes_html = f"<p>{html.escape(notes)}</p>" if notes else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body class="view-both">
<h1>{html.escape(title)}</h1>
{_banners(columns)}
<p class="legend">{len(images)} images &middot; {len(columns)} column(s): {html.escape(", ".join(labels))}. {legend}</p>
{notes_html}
{_controls(columns, page_size, pages)}
<div id="items">
{rows}
</div>
<script>{SCRIPT}</script>
</body></html>
"""


def write_gallery(out_dir: str | os.PathLike, images: list[GalleryImage], columns: list[Column],
                  title: str = "Masks", page_size: int = 24, notes: str = "") -> Path:
    """Write `out_dir/index.html` (atomically) for `images` (rows, in this order) under `columns` (panels,
    left to right; a `kind="gt"` column is usually first) and return its path. `src` values of the
    images are relative to `out_dir` (or `data:` URIs); `notes` is a line of text under the title."""
    path = Path(out_dir) / "index.html"
    write_text(path, gallery_html(images, columns, title, page_size, notes))
    return path
