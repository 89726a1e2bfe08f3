"""Draw detections (boxes, labels, scores, semi-transparent masks) on an image, and save PNGs atomically.

Colours: one distinct colour per label, assigned in order of first appearance from a fixed palette
(so the same call always gives the same colours). Small images (shorter side under `min_side`, 448 px
by default) are first upscaled by a whole factor with nearest-neighbour pixels, boxes and masks with
them, so a 112 px demo image comes out at 448 px with every source pixel a crisp 4x4 block and the
masks on the same pixel grid; the long side stays under `MAX_SIDE`. Line width and font size then
scale with the output's shorter side so labels stay readable on thumbnails and on large photos.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .parse import Detection

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
    (255, 225, 25), (128, 128, 128),
)


def label_colors(detections: Sequence[Detection]) -> dict[str, tuple[int, int, int]]:
    """Label -> colour, distinct for the first len(PALETTE) labels (first-appearance order)."""
    out: dict[str, tuple[int, int, int]] = {}
    for d in detections:
        if d.label not in out:
            out[d.label] = PALETTE[len(out) % len(PALETTE)]
    return out


MIN_SIDE = 448  # shorter side of an annotated small image
MAX_SIDE = 4096  # the upscaled long side stays at or under this (a 1000x20 strip is not blown up 23x)


def upscale_factor(size: tuple[int, int], min_side: int = MIN_SIDE) -> int:
    """The whole factor k >= 1 that brings the shorter side of a (width, height) image to at least
    `min_side` (0 = never upscale), limited so the long side stays <= MAX_SIDE."""
    w, h = size
    if min_side <= 0 or min(w, h) >= min_side:
        return 1
    return max(1, min(math.ceil(min_side / min(w, h)), MAX_SIDE // max(w, h)))


def _upscaled(image: Image.Image, detections: Sequence[Detection], k: int):
    """`image` and `detections` k times larger: nearest-neighbour pixels, boxes times k, masks repeated."""
    if k == 1:
        return image, list(detections)
    big = image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)
    out = []
    for d in detections:
        mask = d.mask
        if mask is not None:
            mask = np.repeat(np.repeat(np.asarray(mask, dtype=bool), k, axis=0), k, axis=1)  # [H*k, W*k]
        out.append(replace(d, box=tuple(v * k for v in d.box), mask=mask))
    return big, out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def draw(image: Image.Image, detections: Sequence[Detection], *, show_scores: bool = True,
         mask_alpha: float = 0.45, min_side: int = MIN_SIDE) -> Image.Image:
    """A copy of `image` (RGB) with masks tinted, boxes outlined and labels written. Detections are in
    `image`'s pixels; an image whose shorter side is under `min_side` is drawn `upscale_factor` times
    larger (nearest neighbour), so the result is `image.size` times that factor (`min_side=0`: same size)."""
    out, detections = _upscaled(image.convert("RGB"), detections, upscale_factor(image.size, min_side))
    w, h = out.size
    colors = label_colors(detections)
    arr = np.asarray(out, dtype=np.float32).copy()  # [H, W, 3]
    for d in detections:
        if d.mask is not None:
            m = np.asarray(d.mask, dtype=bool)
            if m.shape == (h, w):
                color = np.array(colors[d.label], dtype=np.float32)
                arr[m] = (1 - mask_alpha) * arr[m] + mask_alpha * color  # [P, 3]
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(out)
    short = min(w, h)
    line = max(1, round(short / 224))
    font = _font(max(12, round(short / 28)))  # 16 px at 448, 43 px at 1200
    for d in detections:
        color = colors[d.label]
        x0, y0, x1, y1 = d.box
        canvas.rectangle([x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)], outline=color, width=line)
        text = d.label or "?"
        if show_scores and d.score is not None:
            text += f" {d.score:.2f}"
        tx0, ty0, tx1, ty1 = canvas.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        lx = min(max(x0, 0), max(w - tw, 0))
        ly = y0 - th if y0 - th >= 0 else min(y0 + line, max(h - th, 0))  # above the box, else inside it
        canvas.rectangle([lx, ly, lx + tw - 1, ly + th - 1], fill=color)
        ink = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 140 else (255, 255, 255)
        canvas.text((lx + 2 - tx0, ly + 2 - ty0), text, fill=ink, font=font)
    return out


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` as PNG via a temp file in the same folder and os.replace (no half-written files)."""
    from ..fileio import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
