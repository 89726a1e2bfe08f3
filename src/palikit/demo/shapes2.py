"""The "shapes v2" synthetic data set (issue 19): shapes at FREE positions, sizes, aspect ratios and
angles on images of any size and aspect ratio, so a model trained on it cannot learn a grid. Same
split seeds, `Shape` / `Sample` records, JSONL + COCO layout and canonical targets as v1
(`palikit.demo.shapes`, whose colours, words, number words and plurals it imports).

Classes (`CLASSES`) and what each one may look like (the whole shape always lies inside the image):

    circle    an ellipse, axis ratio 1-1.5, any angle
    square    a rectangle, side ratio 1-1.5, tilted at most 15 degrees
    triangle  any triangle with its apex anywhere over its base (apex offset <= 0.6), any angle
    star      five points, inner radius 0.38-0.55, stretched <= 1.25, any angle
    cross     a plus sign, arm width 0.3-0.45 of its extent, side ratio 1-1.25, tilted <= 15 degrees
    hexagon   regular, stretched <= 1.25, any angle
`EXTRA_CLASSES` (ring, diamond) draw too but are not in the base set: the fine-tuning test's "new classes".

Shapes are 1-6 per image, 10-55 % of the short side, placed apart, touching (boxes a pixel apart) or
overlapping; a later shape hides what it covers, the earlier one keeps only its visible pixels (mask and
tight box), and a placement that would hide more than 40 % of an earlier shape is redrawn. Colours are
v1's four names, each a range of hue / saturation / value (`COLOR_RANGES`; `color_name` inverts them),
so exact RGB varies. Backgrounds: plain, gradient, noise, stripes, checker, a smooth random field and
blurred clutter (`palikit.demo.backgrounds`), all muted (saturation < 0.5). Half the images hold one word (v1's words, or a 3-4
character code one time in four) in a random TrueType face (`fonts.font_files`), 10-22 % of the
short side, rotated <= 6 degrees; shapes never cover it.

Tasks (`examples`): v1's caption / detect (incl. absent classes) / segment / ocr / count / color, plus
referring expressions (`referring`): "detect the red circle", "segment the largest square",
"the leftmost star", "the blue shape"... asked only when they name exactly one instance (or none:
an empty answer). Instances are listed in the order of their `<loc>` bins (y0, x0, y1, x1), which
does not depend on the pixel size, so exact match is fair on resized images.
"""

from __future__ import annotations

import colorsys
import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..tasks.labels import plural
from ..tasks.boxes import encode_box, encode_loc
from .backgrounds import background
from . import shapes as shapes_v1
from .shapes import SPLIT_SEEDS  # noqa: F401 - the generator interface: gen.SPLIT_SEEDS for v1 and v2
from .shapes import COLORS, NUMBER_WORDS, PLURALS, WORDS, Sample, Shape

CLASSES = ("circle", "square", "triangle", "star", "cross", "hexagon")
EXTRA_CLASSES = ("ring", "diamond")
PLURALS2 = {**PLURALS, **{c: plural(c) for c in CLASSES + EXTRA_CLASSES if c not in PLURALS}}
NUMBER_WORDS2 = NUMBER_WORDS + ("five", "six")
# hue (degrees, may wrap below 0), saturation, value ranges of each colour name; v1's RGB lie inside
COLOR_RANGES = {"red": ((-8, 8), (0.7, 0.95), (0.7, 0.95)), "green": ((100, 145), (0.6, 0.9), (0.55, 0.8)),
                "blue": ((212, 235), (0.65, 0.9), (0.7, 0.95)), "yellow": ((45, 58), (0.7, 0.95), (0.85, 1.0))}
COLOR_NAMES = tuple(COLORS)
REFER_WORDS = ("the", "shape", "largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
SIDES = (80, 640)  # image side range when no size is given
SS = 4  # supersampling of each shape's raster (anti-aliased edges)


@dataclass
class Shape2(Shape):
    """A v1 `Shape` plus its exact fill colour and its whole (unoccluded) mask."""
    rgb: tuple[int, int, int] = (0, 0, 0)
    full_mask: np.ndarray | None = field(default=None, repr=False)


def color_rgb(name: str, rng: random.Random) -> tuple[int, int, int]:
    (h0, h1), (s0, s1), (v0, v1) = COLOR_RANGES[name]
    r, g, b = colorsys.hsv_to_rgb((rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    return round(r * 255), round(g * 255), round(b * 255)


def color_name(rgb) -> str | None:
    """The colour name whose range holds `rgb` (margins for 8-bit rounding: 2 degrees of hue, 0.01 of
    saturation and value), else None."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb[:3]))
    h *= 360
    for name, ((h0, h1), (s0, s1), (v0, v1)) in COLOR_RANGES.items():
        hue_ok = h0 - 2 <= h <= h1 + 2 or h0 - 2 <= h - 360 <= h1 + 2
        if hue_ok and s0 - 0.01 <= s <= s1 + 0.01 and v0 - 0.01 <= v <= v1 + 0.01:
            return name
    return None


# ------------------------------------------------------------------------------ geometry
def _ellipse(n: int = 96, rx: float = 1.0, ry: float = 1.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], 1)


def _outline(cls: str, rng: random.Random) -> tuple[list[np.ndarray], float]:
    """Unit polygons (the first filled, any further one cut out) and the rotation in degrees."""
    ar = rng.uniform(1.0, 1.5)
    stretch = rng.uniform(0.8, 1.25)
    if cls == "circle":
        return [_ellipse(96, ar, 1.0)], rng.uniform(0, 180)
    if cls == "square":
        return [np.array([(-ar, -1), (ar, -1), (ar, 1), (-ar, 1)], float)], rng.uniform(-15, 15)
    if cls == "triangle":
        return [np.array([(rng.uniform(-0.6, 0.6), -1), (1, 1), (-1, 1)], float) * (1, stretch)], rng.uniform(0, 360)
    if cls == "star":
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        return [np.stack([r * np.cos(t), stretch * r * np.sin(t)], 1)], rng.uniform(0, 360)
    if cls == "cross":
        a, b = rng.uniform(0.3, 0.45), 1.0  # half arm width, half length: arm width / extent = a
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
               (-a, -a)]
        return [np.array(pts, float) * (min(ar, 1.25), 1)], rng.uniform(-15, 15)
    if cls == "hexagon":
        t = np.arange(6) * np.pi / 3
        return [np.stack([np.cos(t), stretch * np.sin(t)], 1)], rng.uniform(0, 360)
    if cls == "ring":
        k = rng.uniform(0.45, 0.65)
        return [_ellipse(96, ar, 1.0), _ellipse(96, ar * k, k)], rng.uniform(0, 180)
    if cls == "diamond":
        return [np.array([(0, -1), (rng.uniform(0.5, 0.8), 0), (0, 1), (-rng.uniform(0.5, 0.8), 0)], float)], \
            rng.uniform(-10, 10)
    raise ValueError(f"unknown shape class {cls!r}; choose from {', '.join(CLASSES + EXTRA_CLASSES)}")


def _place_outline(polys: list[np.ndarray], angle: float, extent: float) -> list[np.ndarray]:
    """Rotate, then scale so the longer side of the bounding box is `extent` px, with its corner at 0."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = [p @ np.array([[c, s], [-s, c]]) for p in polys]
    lo = rot[0].min(0)
    scale = extent / (rot[0].max(0) - lo).max()
    return [(p - lo) * scale for p in rot]


def _raster(polys: list[np.ndarray], x: float, y: float, size: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """Anti-aliased coverage (float [h, w] in 0..1) of the polygons shifted by (x, y), inside the image
    window it touches; returns (coverage, (x0, y0, x1, y1) window)."""
    pts = [p + (x, y) for p in polys]
    lo, hi = pts[0].min(0), pts[0].max(0)
    x0, y0 = max(int(lo[0]) - 1, 0), max(int(lo[1]) - 1, 0)
    x1, y1 = min(int(math.ceil(hi[0])) + 1, size[0]), min(int(math.ceil(hi[1])) + 1, size[1])
    layer = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    draw = ImageDraw.Draw(layer)
    for k, p in enumerate(pts):
        draw.polygon([tuple(v) for v in ((p - (x0, y0)) * SS)], fill=0 if k else 255)
    return np.asarray(layer.reduce(SS), dtype=np.float32) / 255.0, (x0, y0, x1, y1)


# ------------------------------------------------------------------------------ text
@functools.lru_cache(maxsize=1)
def usable_fonts() -> tuple[Path, ...]:
    """`fonts.font_files()`: every face there draws all ASCII letters and digits (the words and
    codes use no other characters)."""
    from .fonts import font_files

    return font_files()


def _font(rng: random.Random, px: int) -> tuple[ImageFont.FreeTypeFont, str]:
    path = rng.choice(usable_fonts())
    return ImageFont.truetype(str(path), px), path.name


def _word(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return "".join(rng.choice(CODE_CHARS) for _ in range(rng.randint(3, 4)))
    return rng.choice(WORDS).upper()


def _draw_word(rng: random.Random, arr: np.ndarray, word: str) -> tuple[int, int, int, int]:
    """Render `word` into `arr` (float [h, w, 3], in place) at a free position; returns its pixel box
    (x0, y0, x1, y1), or (0, 0, 0, 0) when even the smallest type does not fit."""
    h, w = arr.shape[:2]
    px = max(10, round(rng.uniform(0.10, 0.22) * min(w, h)))
    font, _ = _font(rng, px)
    stroke = rng.choice((0, 0, max(1, px // 12)))
    for _ in range(6):
        l, t, r, b = font.getbbox(word, stroke_width=stroke)
        if r - l + 4 <= 0.9 * w or px <= 10:
            break
        px = max(10, int(px * 0.8))
        font = font.font_variant(size=px)
    layer = Image.new("LA", (r - l + 8, b - t + 8), (0, 0))
    ImageDraw.Draw(layer).text((4 - l, 4 - t), word, font=font, fill=(255, 255), stroke_width=stroke,
                               stroke_fill=(0, 255))
    layer = layer.rotate(rng.uniform(-6, 6), resample=Image.BICUBIC, expand=True)
    lum, alpha = (np.asarray(c, np.float32) / 255 for c in layer.split())
    th, tw = alpha.shape
    if tw > w or th > h:
        return (0, 0, 0, 0)
    x, y = rng.randint(0, w - tw), rng.randint(0, h - th)
    region = arr[y:y + th, x:x + tw]
    light = region.mean() < 128
    ink = np.array((245, 245, 245) if light else (15, 15, 15), np.float32)
    edge = 255 - ink
    colour = edge + (ink - edge) * lum[..., None]  # the glyph ink, the stroke in the opposite tone
    arr[y:y + th, x:x + tw] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    ys, xs = np.nonzero(alpha > 0.05)
    return (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


# ------------------------------------------------------------------------------ one sample
def _canvas(rng: random.Random, size) -> tuple[int, int]:
    if size is None:
        lo, hi = SIDES
        w = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        h = round(min(max(w * math.exp(rng.uniform(-math.log(2.5), math.log(2.5))), lo), hi))
        return w, h
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if w < 32 or h < 32:
        raise ValueError(f"image size must be at least 32x32 px, got {w}x{h}")
    return w, h


def _boxes_apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _try_place(rng, cls, shapes, text_box, w, h, mode, top):
    """One placement attempt: (coverage, window, box) or None when it breaks the rules."""
    s = min(w, h)
    lo = max(12, 0.10 * s)
    extent = math.exp(rng.uniform(math.log(lo), math.log(max(lo, top * s))))
    polys = _place_outline(*_outline(cls, rng), extent)
    bw, bh = polys[0].max(0)
    if bw >= w - 1 or bh >= h - 1:
        return None
    if mode == "touch" and shapes:
        o = rng.choice(shapes).box
        side = rng.randrange(4)
        gap = rng.uniform(0.0, 1.5)
        x = (o[2] + gap if side == 0 else o[0] - gap - bw) if side in (0, 1) else rng.uniform(o[0] - bw, o[2])
        y = (o[3] + gap if side == 2 else o[1] - gap - bh) if side in (2, 3) else rng.uniform(o[1] - bh, o[3])
    else:
        x, y = rng.uniform(0, w - 1 - bw), rng.uniform(0, h - 1 - bh)
    box = (x, y, x + bw, y + bh)
    if x < 0 or y < 0 or box[2] > w - 1 or box[3] > h - 1:
        return None
    if text_box[2] > 0 and not _boxes_apart(box, text_box, 3):
        return None
    apart = [_boxes_apart(box, o.box, 2 if mode == "free" else -2) for o in shapes]
    if (mode == "overlap" and all(apart)) or (mode != "overlap" and not all(apart)):
        return None
    cov, win = _raster(polys, x, y, (w, h))
    return cov, win, box


def _place_shape(rng, cls, shapes, text_box, w, h, mode, top):
    """(shape, coverage, window) after at most 40 attempts (the last 20 placing it apart), or None."""
    for attempt in range(40):
        got = _try_place(rng, cls, shapes, text_box, w, h, mode if attempt < 20 else "free", top)
        if got is None:
            continue
        cov, (x0, y0, x1, y1), _ = got
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = cov >= 0.5
        if not full.any():
            continue
        # an earlier shape must keep 60 % of its whole area in sight
        if any((o.mask & ~full).sum() < 0.6 * o.full_mask.sum() for o in shapes):
            continue
        return Shape2(cls, "", (0.0, 0.0, 0.0, 0.0), full.copy(), full_mask=full), cov, (x0, y0, x1, y1)
    return None


def make_sample(index: int, seed: int = 0, size=None, word_prob: float = 0.5,
                classes: tuple[str, ...] = CLASSES) -> Sample:
    """One image with its ground truth; the same (index, seed, size, classes) always gives the same
    sample (with the same installed fonts). `size`: None (random sides in `SIDES`, aspect up to 2.5:1),
    an int (square) or (width, height). `sample.shapes` are `Shape2`s in drawing order (later on top);
    there is always one at least (a word that leaves no room for any is left out)."""
    rng = random.Random(seed * 1_000_003 + index)
    w, h = _canvas(rng, size)
    arr, _kind = background(rng, w, h)
    word = _word(rng) if rng.random() < word_prob else None
    text_box = _draw_word(rng, arr, word) if word else (0, 0, 0, 0)
    if word and text_box[2] == 0:
        word = None
    shapes: list[Shape2] = []
    n = rng.choice((1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6))
    top = max(0.2, 0.55 / math.sqrt(n))  # the largest extent, as a share of the short side
    for k in range(n):
        mode = "free" if k == 0 else rng.choice(("free", "free", "free", "touch", "overlap", "overlap"))
        cls, name = rng.choice(classes), rng.choice(COLOR_NAMES)
        placed = _place_shape(rng, cls, shapes, text_box, w, h, mode, top)
        if placed is None:
            continue
        shape, cov, (x0, y0, x1, y1) = placed
        shape.color, shape.rgb = name, color_rgb(name, rng)
        fill = np.array(shape.rgb, np.float32)
        if rng.random() < 0.3:  # soft shading across the shape: +-8 % brightness, kept in the name's range
            v, (v0, v1) = max(shape.rgb) / 255, COLOR_RANGES[name][2]
            ramp = np.linspace(max(0.92, v0 / v), min(1.08, v1 / v), x1 - x0, dtype=np.float32)[None, :, None]
            fill = np.clip(fill * ramp, 0, 255)
        a = cov[..., None]
        arr[y0:y1, x0:x1] = arr[y0:y1, x0:x1] * (1 - a) + fill * a
        for o in shapes:  # the new shape hides what it covers
            o.mask &= ~shape.full_mask
        shapes.append(shape)
    if not shapes and word:  # the word left no room (a tiny image): the same image without a word
        return make_sample(index, seed, size, 0.0, classes)
    for s in shapes:  # tight boxes around the visible part
        ys, xs = np.nonzero(s.mask)
        s.box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.15:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    return Sample(image, shapes, word, index, text_box if word else None)


# ------------------------------------------------------------------------------ targets
ALL_CLASSES = CLASSES + EXTRA_CLASSES  # the canonical class order of captions and prompts


def reading_order(shapes: list[Shape], size: tuple[int, int]) -> list[Shape]:
    """Instances in the order of their `<loc>` bins (y0, x0, y1, x1): what the model writes first comes
    first, the same at every pixel size of the image."""
    return sorted(shapes, key=lambda s: encode_loc(s.box, size))


def caption(shapes: list[Shape]) -> str:
    """v1's caption rule ("a red circle and two blue squares"; class order, then colour order) over
    the v2 classes, with number words up to six."""
    groups: dict[tuple[str, str], int] = {}
    for s in shapes:
        groups[(s.cls, s.color)] = groups.get((s.cls, s.color), 0) + 1
    order = sorted(groups, key=lambda k: (ALL_CLASSES.index(k[0]), COLOR_NAMES.index(k[1])))
    parts = [f"{NUMBER_WORDS2[groups[k]]} {k[1]} {k[0] if groups[k] == 1 else PLURALS2[k[0]]}" for k in order]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def instances_suffix(shapes: list[Shape], size: tuple[int, int], seg_fn=None, label: str | None = None) -> str:
    """`<loc>x4 [<seg>x16] label ; ...` for `shapes` in reading order; label: the class, or `label`."""
    items = []
    for s in reading_order(shapes, size):
        seg = "" if seg_fn is None else "".join(f"<seg{t:03d}>" for t in seg_fn(s))
        items.append(f"{encode_box(s.box, size)}{seg} {label or s.cls}")
    return " ; ".join(items)


def detect_suffix(shapes: list[Shape], classes: list[str], size: tuple[int, int], seg_fn=None) -> str:
    return instances_suffix([s for s in shapes if s.cls in classes], size, seg_fn)


def _ranked(insts: list[Shape], key, margin: float, what: tuple[str, str], cls: str, out: dict) -> None:
    """Name the first and last of `insts` sorted by `key` when they stand out by `margin`."""
    ranked = sorted(insts, key=key)
    if key(ranked[1]) - key(ranked[0]) >= margin:
        out[f"the {what[0]} {cls}"] = [ranked[0]]
    if key(ranked[-1]) - key(ranked[-2]) >= margin:
        out[f"the {what[1]} {cls}"] = [ranked[-1]]


def referring(shapes: list[Shape], size: tuple[int, int], classes: tuple[str, ...] = CLASSES) -> dict[str, list]:
    """Every referring expression the generator asks -> the instances it names: exactly one, or none
    (an absent colour + class: an empty answer). Ambiguous ones (two red circles for "the red circle",
    two squares of about the same size for "the largest square") are left out.

    Forms: "the {colour} {class}", "the {colour} shape", "the largest / smallest {class}" (visible
    area 1.3x the runner-up's), "the leftmost / rightmost / topmost / bottommost {class}" (box centre
    10 % of the side ahead of the runner-up)."""
    w, h = size
    out: dict[str, list] = {}
    for cls in [c for c in ALL_CLASSES if c in classes or any(s.cls == c for s in shapes)]:
        for name in COLOR_NAMES:
            hits = [s for s in shapes if s.cls == cls and s.color == name]
            if len(hits) <= 1:
                out[f"the {name} {cls}"] = hits
        insts = [s for s in shapes if s.cls == cls]
        if len(insts) >= 2:
            area = lambda s: math.log(max(int(s.mask.sum()), 1))  # noqa: E731
            _ranked(insts, area, math.log(1.3), ("smallest", "largest"), cls, out)
            _ranked(insts, lambda s: (s.box[0] + s.box[2]) / 2, 0.1 * w, ("leftmost", "rightmost"), cls, out)
            _ranked(insts, lambda s: (s.box[1] + s.box[3]) / 2, 0.1 * h, ("topmost", "bottommost"), cls, out)
    for name in COLOR_NAMES:
        hits = [s for s in shapes if s.color == name]
        if len(hits) == 1:
            out[f"the {name} shape"] = hits
    return out


def _refer_examples(sample: Sample, rng: random.Random, classes, seg_fn) -> list[dict]:
    size = sample.image.size
    exprs = referring(sample.shapes, size, classes)
    present = sorted(e for e, t in exprs.items() if t)
    absent = sorted(e for e, t in exprs.items() if not t)
    present_cls = {s.cls for s in sample.shapes}
    hard = [e for e in absent if e.split()[-1] in present_cls]  # the class is there, in another colour
    out = []
    pick = rng.choice(present) if present and (rng.random() < 0.75 or not absent) else \
        rng.choice(hard if hard and rng.random() < 0.5 else absent)
    target = exprs[pick]
    out.append({"prefix": f"detect {pick}", "suffix": instances_suffix(target, size, label=pick),
                "task": "refer_detect", "box": list(target[0].box) if target else None})
    if seg_fn is not None and present:
        from ..tasks.rle import mask_to_rle

        pick = rng.choice(present)
        s = exprs[pick][0]
        out.append({"prefix": f"segment {pick}", "suffix": instances_suffix([s], size, seg_fn, label=pick),
                    "task": "refer_segment", "label": pick, "box": list(s.box), "mask": mask_to_rle(s.mask)})
    return out


TASKS = ("caption", "detect", "segment", "refer_detect", "refer_segment", "ocr", "count", "color")  # rows' task field


def examples(sample: Sample, rng: random.Random, seg_fn=None, classes: tuple[str, ...] = CLASSES) -> list[dict]:
    """Prefix/suffix pairs for one sample: v1's tasks (caption, detect every present class, detect
    random classes that may be absent, segment, ocr, count, color) plus one referring detect (present
    or absent) and, with `seg_fn`, one referring segment."""
    size = sample.image.size
    present = sorted({s.cls for s in sample.shapes}, key=ALL_CLASSES.index)
    out = [{"prefix": "caption en", "suffix": caption(sample.shapes), "task": "caption"},
           {"prefix": "detect " + " ; ".join(present), "suffix": detect_suffix(sample.shapes, present, size),
            "task": "detect"}]
    asked = set(rng.sample(classes, min(rng.choice((1, 1, 2, 3)), len(classes))))  # 2 classes: at most 2
    if rng.random() < 0.5:  # half the time, make sure at least one asked class is present
        asked = set(sorted(asked)[:-1]) | {rng.choice(present)}
    out += shapes_v1.detect_rows(sample, present, sorted(asked, key=ALL_CLASSES.index), rng, seg_fn, detect_suffix)
    out += _refer_examples(sample, rng, classes, seg_fn)
    if sample.word:
        out.append({"prefix": "ocr", "suffix": sample.word, "task": "ocr"})
    return out + shapes_v1.answer_rows(sample, present, rng, classes, PLURALS2)


def vocabulary() -> list[str]:
    """Every whole word the prompts and targets use besides v1's task words (`build.TASK_WORDS`) and
    the characters of codes: a v2 tokenizer's word pieces."""
    words = (list(ALL_CLASSES) + [PLURALS2[c] for c in ALL_CLASSES] + list(COLOR_NAMES) + list(NUMBER_WORDS2)
             + list(REFER_WORDS) + [w.upper() for w in WORDS])
    return sorted(set(words))


# ------------------------------------------------------------------------------ splits
def iter_split(split: str, n: int, size=None, classes: tuple[str, ...] = CLASSES) -> Iterator[Sample]:
    return shapes_v1.iter_split(split, n, size, make=make_sample, classes=classes)
