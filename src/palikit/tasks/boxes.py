"""Box geometry: pixel boxes <-> PaliGemma's `<locNNNN>` tokens, and box IoU. The one home of the
coordinate convention (README "Coordinates"); the parser, the training-data writers and the metrics
import it from here.

A box is pixel (x0, y0, x1, y1) in the ORIGINAL image of size (width, height). PaliGemma writes it as
four `<locNNNN>` tokens in the order (y0, x0, y1, x1); each is a bin 0..1023 (`LOC_BINS` = 1024).
The coordinate denominator d says what a bin means, `value = bin / d * side`:

- 1024 (default: the official demo, the HF blog, supervision): a bin is 1/1024 of the side, so the
  far edge encodes as bin 1023 (clipped) and decodes 1/1024 of the side short of it;
- 1023 (big_vision's RefCOCO code): bin 1023 is the far edge exactly.

Encoding is `round(v / side * d)` (Python's round, half to even) clipped to 0..1023; decoding clips
the pixel value to 0..side. Both are exact inverses on bin values for d = 1023, and within half a
bin (side / d / 2) on pixel values for both denominators.
"""

from __future__ import annotations

from collections.abc import Sequence

LOC_BINS = 1024
DEFAULT_DENOMINATOR = 1024
DENOMINATORS = (1024, 1023)

Box = tuple[float, float, float, float]  # pixel (x0, y0, x1, y1)
Loc = tuple[int, int, int, int]  # bins (y0, x0, y1, x1)


def check_denominator(denominator: int) -> int:
    """`denominator` if it is one of the two conventions, else a ValueError saying which they are."""
    if denominator not in DENOMINATORS:
        raise ValueError("coord_denominator must be 1024 (official demo) or 1023 (big_vision RefCOCO), "
                         f"got {denominator!r}")
    return int(denominator)


def _check_size(image_size: Sequence[float]) -> tuple[float, float]:
    try:
        w, h = (float(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    if not (w > 0 and h > 0):
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return w, h


def loc_bin(value: float, side: float, denominator: int = DEFAULT_DENOMINATOR) -> int:
    """One pixel coordinate on an image side of `side` pixels as a bin: round(v / side * d) in 0..1023."""
    return min(max(round(value / side * denominator), 0), LOC_BINS - 1)


def loc_token(bin_value: int) -> str:
    """`<locNNNN>` for a bin 0..1023."""
    if not 0 <= bin_value < LOC_BINS:
        raise ValueError(f"a <loc> bin is 0..{LOC_BINS - 1}, got {bin_value}")
    return f"<loc{bin_value:04d}>"


def encode_loc(box: Sequence[float], image_size: Sequence[float], denominator: int = DEFAULT_DENOMINATOR) -> Loc:
    """Pixel (x0, y0, x1, y1) in an image of (width, height) -> bins (y0, x0, y1, x1)."""
    w, h = _check_size(image_size)
    d = check_denominator(denominator)
    x0, y0, x1, y1 = (float(v) for v in box)
    return loc_bin(y0, h, d), loc_bin(x0, w, d), loc_bin(y1, h, d), loc_bin(x1, w, d)


def encode_box(box: Sequence[float], image_size: Sequence[float], denominator: int = DEFAULT_DENOMINATOR) -> str:
    """Pixel (x0, y0, x1, y1) in an image of (width, height) -> `<locY0><locX0><locY1><locX1>`."""
    return "".join(loc_token(v) for v in encode_loc(box, image_size, denominator))


def decode_loc(loc: Sequence[int], image_size: Sequence[float], denominator: int = DEFAULT_DENOMINATOR) -> Box:
    """Bins (y0, x0, y1, x1) -> pixel (x0, y0, x1, y1) in an image of (width, height), clipped to it.
    Degenerate bins (y1 <= y0 or x1 <= x0) decode as they are: the parser is the one that drops them."""
    w, h = _check_size(image_size)
    d = check_denominator(denominator)
    y0, x0, y1, x1 = loc
    return (min(max(x0 / d * w, 0.0), w), min(max(y0 / d * h, 0.0), h),
            min(max(x1 / d * w, 0.0), w), min(max(y1 / d * h, 0.0), h))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; a degenerate box has area 0; 0.0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
