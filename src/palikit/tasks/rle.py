"""COCO mask encodings, the one home: run-length encoding of bool masks (`mask_to_rle` /
`rle_to_mask`: uncompressed `{"size": [h, w], "counts": [...]}` in column-major order, plus COCO's
compressed string form that pycocotools' `loadRes` needs) and a COCO annotation's `segmentation`
(polygons, uncompressed or compressed RLE) -> bool mask (`segmentation_to_mask`).

RLE is done here in NumPy, equal to pycocotools' `encode`/`decode` (tests/test_rle.py), so no
dependency is needed for it; polygons are rasterised by pycocotools when installed (COCO's own
rasteriser) and by PIL otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["mask_to_rle", "rle_to_mask", "segmentation_to_mask"]


def _runs(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")  # COCO counts run down columns
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts  # counts always start with a run of zeros
    return [int(c) for c in counts]


def _compress(counts: list[int]) -> str:
    """COCO's string form of counts (maskApi.c rleToString): deltas to the count two back, in 5-bit
    little-endian groups with a continuation bit, offset by 48 into printable ASCII."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            b = x & 0x1F
            x >>= 5
            more = (x != -1) if (b & 0x10) else (x != 0)
            if more:
                b |= 0x20
            out.append(chr(b + 48))
    return "".join(out)


def _decompress(s: str) -> list[int]:
    """Inverse of `_compress`; a ValueError for a string COCO could not have written."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError(f"compressed RLE counts {s[:20]!r}... end inside a number (truncated?)")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE counts hold {s[p]!r}, which is not one of COCO's characters '0'..'o'")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def mask_to_rle(mask: np.ndarray, compressed: bool = False) -> dict[str, Any]:
    """COCO RLE of a 2-D mask: {"size": [h, w], "counts": [...]} (or a COCO string when compressed)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
    counts = _runs(m)
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _compress(counts) if compressed else counts}


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (list counts or compressed string/bytes counts) to a bool [H, W] array."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _decompress(counts)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError(f"RLE counts must be non-negative, got {min(counts)}")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected h*w = {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def _polygons_to_mask(polygons: list, height: int, width: int) -> np.ndarray:
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        mask_utils = None
    if mask_utils is not None:
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
    from PIL import Image, ImageDraw

    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(img, dtype=bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO annotation's `segmentation` -> bool [height, width] mask: a list of polygons
    ([x0, y0, x1, y1, ...] each), or an RLE dict (list counts or compressed string counts) whose
    `size` must be [height, width]."""
    if isinstance(segmentation, list):
        return _polygons_to_mask(segmentation, int(height), int(width))
    if isinstance(segmentation, Mapping) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [int(height), int(width)]:
            raise ValueError(f"segmentation RLE size {size} differs from the image's [height, width] "
                             f"[{int(height)}, {int(width)}]")
        return rle_to_mask(segmentation)
    raise ValueError("a COCO segmentation is a list of polygons or an RLE dict with size and counts, "
                     f"got {type(segmentation).__name__}")
