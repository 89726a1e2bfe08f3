"""Write the 20 hand-made test images of issue 19 (lab/data/handmade/): scenes laid out by hand,
drawn by a routine that shares nothing with the generator (`palikit.demo.shapes2`): analytic geometry
in numpy (circle distance, even-odd point-in-polygon), 4x4 sub-pixel samples per pixel, fixed fill
colours that are none of the generator's (but inside the colour names' ranges), optional black
outlines, and backgrounds the generator does not make (pure white, graph paper, ruled paper, a sky
gradient, dots, a dark slate, a vignette). Deterministic: no random numbers at all.

    python -m lab.demo.handmade [--out lab/data/handmade]

Writes NN.png, truth.json (per image: size, background, objects with label, colour name, fill RGB,
tight box of the visible pixels, a probe point inside the visible fill, outline px, occluded flag), detect.jsonl
(`detect <present classes>` with the canonical suffix, the training/eval JSONL layout) and coco.json
(the same ground truth as COCO instances, what `palikit eval --task detect` scores).
Image 00 is the issue's own: 224x224, a red circle at (40, 60, 120, 140), a blue square at (140, 30, 200, 90).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from palikit.demo.shapes2 import CLASSES, Shape2, detect_suffix
from palikit.fileio import atomic_write_bytes, atomic_write_json
from palikit.tasks.rle import mask_to_rle

FILLS = {"red": (204, 36, 48), "green": (52, 148, 72), "blue": (32, 92, 198), "yellow": (242, 206, 42)}
ALT = {"red": (226, 52, 40), "green": (40, 150, 66), "blue": (58, 110, 222), "yellow": (230, 190, 30)}
SUB = 4  # sub-pixel samples per side


def polygon_points(cls: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Vertices of an upright shape of radius r around (cx, cy)."""
    if cls == "square":
        p = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif cls == "triangle":
        p = [(0, -1), (1, 1), (-1, 1)]
    elif cls == "hexagon":
        p = [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3 + math.pi / 6]
    elif cls == "star":
        p = [((1 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
              (1 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif cls == "cross":
        a = 0.36
        p = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    else:
        raise ValueError(cls)
    return np.array(p, float) * r + (cx, cy)


def inside(cls: str, geom, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean: which sample points (xs, ys) lie in the shape."""
    if cls == "circle":
        cx, cy, rx, ry = geom
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    if cls == "rect":  # axis-aligned square given by its box
        x0, y0, x1, y1 = geom
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    pts = geom
    hit = np.zeros(xs.shape, bool)
    for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (ya > ys) != (yb > ys)
        xint = xa + (ys - ya) * (xb - xa) / ((yb - ya) if yb != ya else 1e-12)
        hit ^= crosses & (xs < xint)
    return hit


def coverage(cls: str, geom, w: int, h: int, grow: float = 0.0) -> np.ndarray:
    """Share of each pixel's 4x4 samples inside the shape ([h, w] float); `grow` > 0 scales it up about
    its centre (the outline ring)."""
    off = (np.arange(SUB) + 0.5) / SUB
    ys = (np.arange(h)[:, None] + off[None]).reshape(h, SUB, 1, 1)  # [h, SUB, 1, 1] sample rows
    xs = (np.arange(w)[:, None] + off[None]).reshape(1, 1, w, SUB)  # [1, 1, w, SUB] sample columns
    ys, xs = np.broadcast_to(ys, (h, SUB, w, SUB)), np.broadcast_to(xs, (h, SUB, w, SUB))
    if grow:
        geom = _grown(cls, geom, grow)
    return inside(cls, geom, xs, ys).mean(axis=(1, 3))


def _grown(cls, geom, px):
    if cls == "circle":
        cx, cy, rx, ry = geom
        return (cx, cy, rx + px, ry + px)
    if cls == "rect":
        x0, y0, x1, y1 = geom
        return (x0 - px, y0 - px, x1 + px, y1 + px)
    c = geom.mean(0)
    r = np.abs(geom - c).max()
    return (geom - c) * (r + px * 1.6) / r + c


def background(kind: str, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    if kind == "white":
        return np.full((h, w, 3), 255.0)
    if kind == "cream":
        return np.broadcast_to(np.array([246.0, 240, 222]), (h, w, 3)).copy()
    if kind == "grey":
        return np.full((h, w, 3), 200.0)
    if kind == "slate":
        return np.broadcast_to(np.array([48.0, 54, 62]), (h, w, 3)).copy()
    if kind == "graph":
        line = ((xx % 16) < 1) | ((yy % 16) < 1)
        return np.where(line[..., None], np.array([170.0, 200, 215]), 250.0)
    if kind == "ruled":
        line = (yy % 22) < 1.5
        return np.where(line[..., None], np.array([150.0, 170, 220]), np.array([252.0, 252, 246]))
    if kind == "sky":
        t = (yy / h)[..., None]
        return np.array([150.0, 185, 215]) * (1 - t) + np.array([225.0, 232, 236]) * t
    if kind == "dots":
        d = ((xx % 12) - 6) ** 2 + ((yy % 12) - 6) ** 2 < 3
        return np.where(d[..., None], 185.0, 238.0)
    if kind == "vignette":
        r = np.hypot((xx - w / 2) / w, (yy - h / 2) / h)[..., None]
        return 235.0 - 190.0 * np.clip(r, 0, 0.7)
    raise ValueError(kind)


# (size, background, [(class, colour, geometry, outline px, alt fill)]); geometry: circle (cx, cy, rx, ry),
# rect (x0, y0, x1, y1) for squares, else (cx, cy, r) of an upright polygon. Later objects are on top.
SCENES = [
    ((224, 224), "white", [("circle", "red", (80, 100, 40, 40), 0, 0), ("rect", "blue", (140, 30, 200, 90), 0, 0)]),
    ((320, 240), "white", [("triangle", "green", (90, 120, 60), 0, 0), ("star", "yellow", (230, 110, 55), 0, 0)]),
    ((200, 300), "cream", [("hexagon", "blue", (100, 90, 50), 0, 0), ("cross", "red", (100, 220, 45), 0, 0)]),
    ((256, 256), "graph", [("circle", "yellow", (70, 70, 40, 40), 2, 0), ("rect", "red", (150, 140, 230, 220), 2, 0),
                           ("triangle", "blue", (70, 190, 45), 2, 0)]),
    ((400, 200), "sky", [("star", "red", (80, 100, 60), 0, 1), ("circle", "green", (210, 100, 55, 40), 0, 0),
                         ("hexagon", "yellow", (330, 100, 50), 0, 0)]),
    ((160, 160), "grey", [("cross", "blue", (80, 80, 55), 0, 1)]),
    ((480, 360), "ruled", [("rect", "green", (40, 40, 160, 160), 0, 0), ("circle", "blue", (300, 120, 70, 70), 0, 1),
                           ("star", "red", (130, 270, 70), 0, 0), ("triangle", "yellow", (370, 270, 70), 2, 0)]),
    ((300, 300), "slate", [("circle", "yellow", (110, 110, 70, 70), 0, 0),
                           ("rect", "red", (150, 150, 260, 260), 0, 0)]),
    ((128, 96), "white", [("triangle", "red", (40, 50, 30), 0, 1), ("circle", "blue", (96, 48, 22, 22), 0, 0)]),
    ((240, 320), "dots", [("hexagon", "green", (120, 90, 60), 2, 0), ("star", "blue", (120, 230, 65), 0, 0)]),
    ((360, 240), "vignette", [("cross", "yellow", (90, 120, 60), 0, 0), ("cross", "red", (270, 120, 60), 0, 0)]),
    ((224, 224), "white", [("rect", "blue", (30, 30, 110, 110), 0, 0), ("rect", "blue", (110, 110, 190, 190), 0, 1)]),
    ((320, 320), "cream", [("circle", "red", (120, 160, 80, 80), 0, 0), ("circle", "green", (215, 160, 60, 60), 0, 0)]),
    ((200, 200), "graph", [("star", "yellow", (100, 100, 80), 2, 1)]),
    ((512, 288), "sky", [("triangle", "red", (90, 150, 70), 0, 0), ("rect", "yellow", (200, 90, 310, 200), 0, 0),
                         ("hexagon", "blue", (420, 150, 70), 0, 0)]),
    ((180, 240), "white", [("circle", "blue", (90, 70, 45, 30), 0, 0), ("triangle", "green", (90, 175, 50), 0, 1)]),
    ((260, 200), "slate", [("hexagon", "red", (80, 100, 55), 0, 0), ("star", "green", (150, 100, 55), 0, 0),
                           ("cross", "blue", (220, 60, 30), 0, 0)]),
    ((300, 200), "ruled", [("rect", "red", (30, 50, 130, 150), 2, 0), ("rect", "yellow", (170, 50, 270, 150), 2, 0)]),
    ((224, 160), "dots", [("circle", "green", (60, 80, 40, 40), 0, 1), ("cross", "yellow", (160, 80, 50), 0, 0)]),
    ((400, 400), "vignette", [("triangle", "blue", (110, 110, 80), 0, 0), ("star", "red", (290, 120, 80), 0, 0),
                              ("circle", "yellow", (120, 290, 70, 70), 0, 0),
                              ("hexagon", "green", (290, 290, 75), 0, 0)]),
]


def render(scene):
    """(image uint8 [h, w, 3], objects with their visible masks) of one scene."""
    (w, h), bg, objs = scene
    img = background(bg, w, h)
    drawn = []
    for kind, colour, geom, outline, alt in objs:
        cls = "square" if kind == "rect" else kind
        g = geom if kind in ("circle", "rect") else polygon_points(kind, *geom)
        cov = coverage(kind, g, w, h)
        if outline:
            ring = coverage(kind, g, w, h, grow=outline)
            img = img * (1 - ring[..., None])  # black outline under the fill
            cov_all = ring
        else:
            cov_all = cov
        rgb = (ALT if alt else FILLS)[colour]
        img = img * (1 - cov[..., None]) + np.array(rgb, float) * cov[..., None]
        mask = cov_all >= 0.5
        for o in drawn:
            o["mask"] &= ~mask
        drawn.append({"cls": cls, "color": colour, "rgb": rgb, "mask": mask, "fill": cov >= 0.99, "outline": outline})
    return np.clip(np.round(img), 0, 255).astype(np.uint8), drawn


def probe(obj) -> tuple[int, int]:
    """A pixel inside the visible fill: the box centre when it is in, else the fill pixel nearest it."""
    ys, xs = np.nonzero(obj["mask"])
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    fy, fx = np.nonzero(obj["mask"] & obj["fill"])
    if obj["mask"][cy, cx] and obj["fill"][cy, cx]:
        return cx, cy
    k = int(np.argmin((fx - cx) ** 2 + (fy - cy) ** 2))
    return int(fx[k]), int(fy[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "handmade"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    truth, rows, images, anns = [], [], [], []
    for i, scene in enumerate(SCENES):
        arr, objs = render(scene)
        name = f"{i:02d}.png"
        Image.fromarray(arr).save(out / name, optimize=True)
        (w, h), bg = scene[0], scene[1]
        shapes, items = [], []
        for o in objs:
            ys, xs = np.nonzero(o["mask"])
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            items.append({"label": o["cls"], "color": o["color"], "rgb": list(o["rgb"]), "box": box,
                          "point": list(probe(o)), "outline": o["outline"],
                          "occluded": bool(o["mask"].sum() < (o["mask"] | o["fill"]).sum())})
            shapes.append(Shape2(o["cls"], o["color"], tuple(float(v) for v in box), o["mask"]))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CLASSES.index(o["cls"]) + 1,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "area": int(o["mask"].sum()),
                         "iscrowd": 0, "segmentation": mask_to_rle(o["mask"])})
        truth.append({"image": name, "width": w, "height": h, "background": bg, "objects": items})
        present = sorted({s.cls for s in shapes}, key=CLASSES.index)
        rows.append(json.dumps({"id": f"{i:02d}", "image": name, "prefix": "detect " + " ; ".join(present),
                                "suffix": detect_suffix(shapes, present, (w, h)), "task": "detect"}))
        images.append({"id": i, "file_name": name, "width": w, "height": h})
    atomic_write_json(out / "truth.json", truth)
    atomic_write_bytes(out / "detect.jsonl", "\n".join(rows) + "\n")
    atomic_write_json(out / "coco.json", {"images": images, "annotations": anns,
                                          "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]})
    print(f"{len(SCENES)} images -> {out}")


if __name__ == "__main__":
    main()
