"""Muted synthetic backgrounds for the shapes v2 images (`palikit.demo.shapes2`): plain (a colour, or
white / grey paper), gradient, noise, stripes, checker, a smooth random field, and blurred clutter.
Every kind is desaturated to <= 0.5, so no background pixel falls in a colour name's range and the
shapes' colours stay unambiguous."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("plain", "gradient", "noise", "stripes", "checker", "field", "clutter")


def smooth_field(nrng: np.random.Generator, w: int, h: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros((h, w, 3), np.float32)
    for o in range(octaves):
        cells = 2 ** (o + 1)
        small = nrng.normal(0, 1, (cells + 1, cells + 1, 3)).astype(np.float32)
        img = Image.fromarray(((np.tanh(small) + 1) * 127.5).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        out += (np.asarray(img, np.float32) - 127.5) / (o + 1)
    return out


def background(rng: random.Random, w: int, h: int) -> tuple[np.ndarray, str]:
    """A muted background (float [h, w, 3]) and its kind."""
    kind = rng.choice(KINDS)
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    a, b = (np.array([rng.randint(0, 255) for _ in range(3)], np.float32) for _ in range(2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)  # [h, w] coordinate along a random direction
    if kind == "plain":
        paper = np.array([rng.randint(225, 255)] * 3, np.float32)  # white / grey paper, one time in three
        arr = np.broadcast_to(paper if rng.random() < 0.33 else a, (h, w, 3)).copy()
    elif kind == "gradient":
        t = ((along - along.min()) / max(float(np.ptp(along)), 1.0))[..., None]
        arr = a * (1 - t) + b * t
    elif kind == "noise":
        arr = a + nrng.normal(0, rng.uniform(10, 30), (h, w, 3))
    elif kind == "stripes":
        period = rng.uniform(6, max(8, 0.25 * min(w, h)))
        t = (0.5 + 0.5 * np.sin(2 * np.pi * along / period))[..., None]
        arr = a * (1 - t) + b * t if rng.random() < 0.5 else np.where(t > 0.5, a, b)
    elif kind == "checker":
        cell = rng.uniform(6, max(8, 0.2 * min(w, h)))
        across = -xx * math.sin(theta) + yy * math.cos(theta)
        arr = np.where(((np.floor(along / cell) + np.floor(across / cell)) % 2 == 0)[..., None], a, b)
    else:
        arr = a + smooth_field(nrng, w, h) * rng.uniform(0.5, 1.0)
        if kind == "clutter":
            arr = clutter(rng, arr, w, h)
    # muted: saturation scaled to <= 0.5 at the same value (max channel), so white paper stays white
    # and no background pixel falls in a colour name's range (saturation >= 0.6)
    arr = np.clip(arr, 0, 255)
    value = arr.max(-1, keepdims=True)
    return value - rng.uniform(0.25, 0.5) * (value - arr), kind


def clutter(rng: random.Random, arr: np.ndarray, w: int, h: int) -> np.ndarray:
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(8, 25)):
        col = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.uniform(-0.1, 1) * w, rng.uniform(-0.1, 1) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        kind = rng.choice(("rect", "ellipse", "line"))
        if kind == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=col)
        elif kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=col)
        else:
            draw.line((x0, y0, x1, y1), fill=col, width=max(1, round(rng.uniform(0.01, 0.04) * min(w, h))))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 2.0 + 0.03 * min(w, h))))
    return np.asarray(img, np.float32)
