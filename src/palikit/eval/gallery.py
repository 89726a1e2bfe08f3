"""The worst predictions of an evaluation as one PNG (`worst.png`, linked from report.md): a grid of
tiles, worst first, each the image with the model's boxes and masks drawn (`tasks.draw`), the
ground-truth boxes as white outlines (detect / segment), and under it the sample id, its score and
what went wrong (missed and extra boxes; or the answer beside the reference).

How samples are ranked: the task's per-sample score where it has one (OCR accuracy, VQA, ANLS,
count, exact, referring-segmentation IoU); for COCO detect / segment, the F1 of the one-to-one match
at box IoU >= 0.5 between the boxes and the ground truth (`instances.judge_instances`: same class,
labels mapped to categories as for mAP). Only samples scoring below 1 enter; failed samples (no
image to draw) and tasks without a per-sample score (caption) give no gallery.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TILE = 256  # px, the side of one tile's picture
COLUMNS = 4


@dataclass
class Entry:
    """One sample of the gallery: its score (0..1, lower is worse) and the lines under its tile."""

    sample: Any
    score: float
    lines: list[str]
    truth: list[tuple[float, float, float, float]]


@dataclass
class _Det:
    """A detection as `judge_instances` reads it (label mapped to its category's name)."""

    label: str
    box: tuple


def _coco_entry(sample, rec, coco_ann, names, cats) -> Entry:
    from .instances import Expected, judge_instances

    truth = [Expected(names[a["category_id"]], (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                a["bbox"][1] + a["bbox"][3])) for a in coco_ann]
    dets = []
    for d in rec.get("detections", []):
        cid = cats.get(str(d.get("label")), cats.get(str(d.get("label")).lower()))
        dets.append(_Det(names.get(cid, str(d.get("label"))), tuple(d["box"])))
    v = judge_instances(dets, truth)
    tp = v.matched.count(True)
    extra = len(dets) - tp
    score = 1.0 if not dets and not truth else 2 * tp / (2 * tp + extra + v.missed)
    negs = set(sample.meta.get("negatives") or [])
    on_absent = sum(1 for d, m in zip(dets, v.matched) if not m and d.label in negs)
    why = [f"missed {v.missed} of {len(truth)}", f"extra {extra}" + (f" ({on_absent} of an absent class)"
                                                                       if on_absent else "")]
    return Entry(sample, score, [", ".join(why)], [t.box for t in truth])


def rank(task: str, samples: Sequence[Any], recs: Mapping[str, Mapping[str, Any]],
         coco: Mapping[str, Any] | None) -> list[Entry]:
    """Every scored, not failed sample as an `Entry`, worst first (ties: the dataset's order)."""
    from . import metrics_tasks as MT

    done = [s for s in samples if s.id in recs and not recs[s.id].get("failed")]
    entries: list[Entry] = []
    if coco is not None and MT.primary(task) in ("map", "miou"):
        names, cats = {c["id"]: c["name"] for c in coco["categories"]}, MT.category_lookup(coco)
        by_image: dict[Any, list] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        entries = [_coco_entry(s, recs[s.id], by_image.get(s.meta["image_id"], []), names, cats) for s in done]
    else:
        for s in done:
            v = MT.sample_score(task, recs[s.id], s)
            if v is None:
                return []  # corpus-level metric only (caption): no per-sample ranking
            ref = " | ".join(s.refs[:3]) if s.refs else ""
            entries.append(Entry(s, float(v), [f"answer: {recs[s.id].get('text', '')!r}"] +
                                 ([f"expected: {ref!r}"] if ref else []), []))
    order = sorted(range(len(entries)), key=lambda i: (entries[i].score, i))
    return [entries[i] for i in order]


def _tile(entry: Entry, rec: Mapping[str, Any], font) -> Any:
    """One tile: the drawn picture letterboxed into TILE x TILE, the caption lines below."""
    from PIL import Image, ImageDraw

    from ..tasks.draw import draw, upscale_factor
    from ..tasks.parse import Detection

    with Image.open(entry.sample.image) as im:
        image = im.convert("RGB")
    dets = [Detection(str(d.get("label", "")), tuple(float(v) for v in d["box"]), (0, 0, 0, 0), d.get("score"),
                      mask=d.get("mask") if d.get("mask") is None or hasattr(d.get("mask"), "shape") else None)
            for d in rec.get("detections", [])]
    k = upscale_factor(image.size, TILE)
    pic = draw(image, dets, min_side=TILE)
    canvas = ImageDraw.Draw(pic)
    for x0, y0, x1, y1 in entry.truth:  # ground truth: white outline with a dark edge, under no label
        canvas.rectangle([x0 * k, y0 * k, x1 * k - 1, y1 * k - 1], outline=(0, 0, 0), width=3)
        canvas.rectangle([x0 * k, y0 * k, x1 * k - 1, y1 * k - 1], outline=(255, 255, 255), width=1)
    pic.thumbnail((TILE, TILE))
    lines = [f"#{entry.sample.id}  score {100 * entry.score:.1f}"]
    lines += [piece for line in entry.lines for piece in textwrap.wrap(line, 40)[:2]]
    tile = Image.new("RGB", (TILE, TILE + 16 * 4), "white")
    tile.paste(pic, ((TILE - pic.width) // 2, (TILE - pic.height) // 2))
    text = ImageDraw.Draw(tile)
    for i, line in enumerate(lines[:4]):
        text.text((4, TILE + 2 + 16 * i), line, fill=(0, 0, 0), font=font)
    return tile


def write_gallery(task: str, samples: Sequence[Any], recs: Mapping[str, Mapping[str, Any]],
                  coco: Mapping[str, Any] | None, path: str | Path, n: int = 12) -> list[Entry]:
    """Draw the `n` worst samples scoring below 1 into the PNG `path` (atomically); returns them
    (empty, and no file written, when no sample can be ranked or every one scores 1)."""
    from PIL import Image, ImageFont

    from ..tasks.draw import save_png

    from .datasets import image_problem

    worst = [e for e in rank(task, samples, recs, coco) if e.score < 1.0 and image_problem(e.sample.image) is None]
    worst = worst[:n]
    if not worst:
        return []
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    tiles = [_tile(e, recs[e.sample.id], font) for e in worst]
    cols = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    w, h = tiles[0].size
    sheet = Image.new("RGB", (cols * w + (cols - 1) * 4, rows * h + (rows - 1) * 4), (200, 200, 200))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * (w + 4), (i // cols) * (h + 4)))
    save_png(sheet, path)
    return worst
