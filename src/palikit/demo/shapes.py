"""The "shapes" synthetic data set behind the bundled demo model: deterministic by seed, with
train / validation / test splits. Each image holds 1-3 shapes (circle, square, triangle) in a few
colours, sizes and grid-aligned positions (some overlapping) on a plain, gradient or noisy background,
and half hold one short rendered word. Every mix-checkpoint task has targets:

    caption en                      -> "a red circle and two blue squares"
    detect circle                   -> "<locY0><locX0><locY1><locX1> circle ; ..."   ("" when absent)
    detect circle ; square          -> both classes, instances in reading order
    segment circle                  -> "<loc>x4 <seg>x16 circle ; ..."  (needs the mask codec)
    ocr                             -> the word
    answer en how many circles are there  -> "2"
    answer en what color is the square    -> "blue"   (asked only when there is exactly one)

Captions and instance orders are canonical (class order, then colour order; instances top-to-bottom
then left-to-right), so exact match is a fair metric. Boxes are encoded by `tasks.boxes.encode_box`
(round(v / side * 1024) clipped to 1023, the inverse of the parser's v / 1024 decode).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..tasks.boxes import encode_box
from ..tasks.labels import plural

CLASSES = ("circle", "square", "triangle")
PLURALS = {c: plural(c) for c in CLASSES}  # circles, squares, triangles
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
WORDS = ("cat", "sun", "box", "map", "key", "cup", "pen", "hat", "owl", "jam", "fox", "bus", "ink", "zip", "web",
         "oak", "gem", "toy", "art", "dot")
NUMBER_WORDS = ("zero", "a", "two", "three", "four")
SPLIT_SEEDS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


@dataclass
class Shape:
    cls: str
    color: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    mask: np.ndarray = field(repr=False)  # bool [H, W], visible part after later shapes are drawn


@dataclass
class Sample:
    image: Image.Image
    shapes: list[Shape]
    word: str | None
    index: int
    text_box: tuple[int, int, int, int] | None = None  # the word's pixel box (shapes v2 only)


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choice(("plain", "gradient", "noise"))
    base = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    if kind == "plain":
        arr = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "gradient":
        other = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        arr = base * (1 - t) + other * t
        arr = np.broadcast_to(arr, (size, size, 3)).copy()
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2).copy()
    else:
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 25, (size, size, 3))
        arr = base + noise
    # keep backgrounds muted so the saturated shape colours stay distinct
    arr = 0.55 * arr + 0.45 * 128
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, cls: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if cls == "circle":
        draw.ellipse(box, fill=fill)
    elif cls == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


GRID = 4  # the image is a 4x4 grid of cells (one cell = one 28 px patch of the demo model)


def make_sample(index: int, seed: int = 0, size: int = 112, word_prob: float = 0.5) -> Sample:
    """One image with its ground truth; the same (index, seed, size) always gives the same sample.

    Shapes are 1-2 grid cells wide and sit on cell boundaries (so box corners take a few values a
    small model can learn on a CPU); one in five multi-shape images lets a shape overlap an earlier
    one, which then keeps only its visible part (tight box and mask around it). A word, when
    present, is rendered in a free 1-cell band, large enough to read at 112 px."""
    rng = random.Random(seed * 1_000_003 + index)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    free = np.ones((GRID, GRID), dtype=bool)  # cells no shape or text uses yet
    text_free = np.ones((GRID, GRID), dtype=bool)  # cells the text band does not use
    word, band = None, None
    if rng.random() < word_prob:
        word = rng.choice(WORDS)
        band = rng.randrange(0, GRID)  # the text's row of cells
        free[band] = text_free[band] = False
    n = rng.choice((1, 1, 2, 2, 3))
    allow_overlap = n > 1 and rng.random() < 0.2
    shapes: list[Shape] = []
    for k in range(n):
        placed = None
        for _attempt in range(40):
            side = rng.choice((1, 2))
            cx, cy = rng.randint(0, GRID - side), rng.randint(0, GRID - side)
            region = free[cy:cy + side, cx:cx + side]
            ok = region.all() or (allow_overlap and k > 0 and text_free[cy:cy + side, cx:cx + side].all()
                                  and region.mean() >= 0.5)
            if ok:
                placed = (cx, cy, side)
                break
        if placed is None:
            continue
        cx, cy, side = placed
        free[cy:cy + side, cx:cx + side] = False
        x0, y0 = round(cx * cell), round(cy * cell)
        x1, y1 = round((cx + side) * cell), round((cy + side) * cell)
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes are inclusive
        cls, color = rng.choice(CLASSES), rng.choice(tuple(COLORS))
        layer = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(layer), cls, box, 255)
        mask = np.array(layer) > 127
        for s in shapes:  # the new shape hides what it covers
            s.mask &= ~mask
        _draw_shape(draw, cls, box, COLORS[color])
        shapes.append(Shape(cls, color, (float(x0), float(y0), float(x1), float(y1)), mask))
    shapes = [s for s in shapes if s.mask.sum() >= 0.5 * _area(s.box) * _FILL[s.cls]] or shapes[-1:]
    for s in shapes:  # tight boxes around the visible part
        ys, xs = np.nonzero(s.mask)
        s.box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    if word is not None:
        # the word fills two cells of its band, centred (one patch pair per word: readable by a tiny tower)
        font = ImageFont.load_default(size=max(10, round(cell * 0.78)))
        bx0, by0, bx1, by1 = draw.textbbox((0, 0), word.upper(), font=font, stroke_width=2)
        col = rng.randint(0, GRID - 2)
        tx = round(col * cell + (2 * cell - (bx1 - bx0)) / 2 - bx0)
        ty = round(band * cell + (cell - (by1 - by0)) / 2 - by0)
        draw.text((tx, ty), word.upper(), fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return Sample(image, shapes, word, index)


_FILL = {"circle": 0.785, "square": 1.0, "triangle": 0.5}  # share of its box a whole shape covers


def _area(box) -> float:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def _reading_order(shapes: list[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda s: (round(s.box[1] / 8), s.box[0]))


def caption(shapes: list[Shape]) -> str:
    groups: dict[tuple[str, str], int] = {}
    for s in shapes:
        groups[(s.cls, s.color)] = groups.get((s.cls, s.color), 0) + 1
    order = sorted(groups, key=lambda k: (CLASSES.index(k[0]), tuple(COLORS).index(k[1])))
    parts = [f"{NUMBER_WORDS[groups[k]]} {k[1]} {k[0] if groups[k] == 1 else PLURALS[k[0]]}" for k in order]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detect_suffix(shapes: list[Shape], classes: list[str], size: tuple[int, int], seg_fn=None) -> str:
    items = []
    for s in _reading_order([s for s in shapes if s.cls in classes]):
        seg = "" if seg_fn is None else "".join(f"<seg{t:03d}>" for t in seg_fn(s))
        items.append(f"{encode_box(s.box, size)}{seg} {s.cls}")
    return " ; ".join(items)


def detect_rows(sample: Sample, present: list[str], asked: list[str], rng: random.Random, seg_fn, suffix) -> list[dict]:
    """The detect row of `asked` when it is not `present` (absent classes answer nothing) and, with
    `seg_fn`, the segment rows: every present class, then one of them alone when there are several.
    `suffix`: the generator's `detect_suffix` (both generators)."""
    size, out = sample.image.size, []
    if asked != present:
        out.append({"prefix": "detect " + " ; ".join(asked), "suffix": suffix(sample.shapes, asked, size),
                    "task": "detect"})
    if seg_fn is not None:
        out.append({"prefix": "segment " + " ; ".join(present), "suffix": suffix(sample.shapes, present, size, seg_fn),
                    "task": "segment"})
        if len(present) > 1:
            one = [rng.choice(present)]
            out.append({"prefix": f"segment {one[0]}", "suffix": suffix(sample.shapes, one, size, seg_fn),
                        "task": "segment"})
    return out


def answer_rows(sample: Sample, present: list[str], rng: random.Random, classes, plurals) -> list[dict]:
    """A count question over a random class of `classes` (`plurals`: their plural words) and, when a
    present class has exactly one instance, its colour (both generators)."""
    count_cls = rng.choice(classes)
    n = sum(s.cls == count_cls for s in sample.shapes)
    out = [{"prefix": f"answer en how many {plurals[count_cls]} are there", "suffix": str(n), "task": "count"}]
    singles = [c for c in present if sum(s.cls == c for s in sample.shapes) == 1]
    if singles:
        c = rng.choice(singles)
        color = next(s.color for s in sample.shapes if s.cls == c)
        out.append({"prefix": f"answer en what color is the {c}", "suffix": color, "task": "color"})
    return out


def examples(sample: Sample, rng: random.Random, seg_fn=None) -> list[dict]:
    """Prefix/suffix pairs for one sample (one per task that applies). Detection and segmentation
    are asked the way `palikit eval` asks a COCO image (every class present, `detect a ; b`), plus one
    detect prompt over random classes that may be absent (empty answer) so the model learns to say so."""
    size = sample.image.size
    present = sorted({s.cls for s in sample.shapes}, key=CLASSES.index)
    out = [{"prefix": "caption en", "suffix": caption(sample.shapes), "task": "caption"},
           {"prefix": "detect " + " ; ".join(present), "suffix": detect_suffix(sample.shapes, present, size),
            "task": "detect"}]
    asked = sorted(rng.sample(CLASSES, rng.choice((1, 1, 2))), key=CLASSES.index)
    if rng.random() < 0.5:  # half the time, make sure at least one asked class is present
        asked = sorted(set(asked[:-1]) | {rng.choice(present)}, key=CLASSES.index)
    out += detect_rows(sample, present, asked, rng, seg_fn, detect_suffix)
    if sample.word:
        out.append({"prefix": "ocr", "suffix": sample.word.upper(), "task": "ocr"})
    return out + answer_rows(sample, present, rng, CLASSES, PLURALS)


def iter_split(split: str, n: int, size: int | None = 112, make=None, **options) -> Iterator[Sample]:
    """The first `n` samples of a split (`make`: the generator's `make_sample`, v1's by default, called
    with `size` and `options`)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SEEDS)}, got {split!r}")
    for i in range(n):
        yield (make or make_sample)(i, SPLIT_SEEDS[split], size, **options)
