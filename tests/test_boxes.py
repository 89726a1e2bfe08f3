"""Box <-> `<loc>` geometry and IoU in their one home (`tasks/boxes.py`), table-driven: encode ->
decode round trips for both coordinate denominators, clipping, rounding, degenerate boxes; the
parser, the demo data writer and the metrics use this one definition."""

from __future__ import annotations

import math
import random

import pytest

from palikit.tasks import box_iou as tasks_box_iou
from palikit.tasks.boxes import (
    DENOMINATORS,
    LOC_BINS,
    box_iou,
    check_denominator,
    decode_loc,
    encode_box,
    encode_loc,
    loc_bin,
    loc_token,
)
from palikit.tasks.parse import parse_detections

SIZES = [(1, 1), (224, 224), (640, 480), (300, 1000), (1023, 7)]


def toks(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


# (box x0 y0 x1 y1, image (w, h), denominator, expected bins y0 x0 y1 x1)
ENCODE = [
    ((0, 0, 200, 100), (200, 100), 1024, (0, 0, 1023, 1023)),  # far edge: 1024 clipped to 1023
    ((0, 0, 200, 100), (200, 100), 1023, (0, 0, 1023, 1023)),  # far edge is bin 1023 exactly
    ((50, 25, 100.1, 75), (200, 100), 1024, (256, 256, 768, 513)),
    ((50, 25, 100, 75), (200, 100), 1023, (256, 256, 767, 512)),  # 255.75 -> 256, 767.25 -> 767, 511.5 -> 512
    ((-10, -5, 250, 120), (200, 100), 1024, (0, 0, 1023, 1023)),  # outside the image: clipped
    ((-10, -5, 250, 120), (200, 100), 1023, (0, 0, 1023, 1023)),
    ((0.5, 1.5, 2.5, 3.5), (1024, 1024), 1024, (2, 0, 4, 2)),  # Python's round: halves to even
    ((10, 10, 10, 10), (100, 100), 1024, (102, 102, 102, 102)),  # degenerate box: equal bins
]


@pytest.mark.parametrize("box,size,d,bins", ENCODE)
def test_encode_table(box, size, d, bins):
    assert encode_loc(box, size, d) == bins
    assert encode_box(box, size, d) == toks(*bins)


# (bins y0 x0 y1 x1, image (w, h), denominator, expected pixel box x0 y0 x1 y1)
DECODE = [
    ((0, 0, 1023, 1023), (1024, 512), 1024, (0.0, 0.0, 1023.0, 511.5)),
    ((0, 0, 1023, 1023), (1024, 512), 1023, (0.0, 0.0, 1024.0, 512.0)),
    ((256, 512, 768, 1000), (300, 200), 1024, (150.0, 50.0, 1000 / 1024 * 300, 150.0)),
    ((100, 100, 100, 100), (50, 50), 1024, (100 / 1024 * 50,) * 4),  # degenerate bins decode as they are
]


@pytest.mark.parametrize("bins,size,d,box", DECODE)
def test_decode_table(bins, size, d, box):
    assert decode_loc(bins, size, d) == pytest.approx(box, abs=1e-9)


@pytest.mark.parametrize("d", DENOMINATORS)
@pytest.mark.parametrize("size", SIZES)
def test_every_bin_survives_decode_then_encode(d, size):
    for b in range(LOC_BINS):
        bins = (b, LOC_BINS - 1 - b, b, b)
        assert encode_loc(decode_loc(bins, size, d), size, d) == bins


@pytest.mark.parametrize("d", DENOMINATORS)
@pytest.mark.parametrize("size", SIZES)
def test_pixels_survive_encode_then_decode_within_half_a_bin(d, size):
    rng = random.Random(d * 7 + size[0])
    w, h = size
    for _ in range(300):
        box = (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h))
        back = decode_loc(encode_loc(box, size, d), size, d)
        for v, u, side in zip(box, back, (w, h, w, h)):
            # d = 1024: the last half bin (v > 1023.5/1024 side) is clipped to bin 1023, one whole bin short
            tol = side / d if d == 1024 and v > 1023.5 / 1024 * side else side / d / 2
            assert abs(u - v) <= tol + 1e-9
        assert all(0.0 <= u <= s for u, s in zip(back, (w, h, w, h)))  # decoded boxes stay inside the image


@pytest.mark.parametrize("d", DENOMINATORS)
def test_parser_decodes_what_encode_box_writes(d):
    size = (640, 480)
    box = (33.3, 100.0, 600.2, 479.0)
    r = parse_detections(encode_box(box, size, d) + " dog", size, coord_denominator=d)
    assert [x.box for x in r.detections] == [decode_loc(encode_loc(box, size, d), size, d)]
    assert r.detections[0].loc == encode_loc(box, size, d) and not r.errors


def test_degenerate_boxes_encode_but_the_parser_drops_them():
    text = encode_box((10, 10, 10, 40), (100, 100)) + " a ; " + encode_box((10, 40, 30, 20), (100, 100)) + " b"
    r = parse_detections(text, (100, 100))
    assert r.detections == [] and sum("degenerate" in e for e in r.errors) == 2


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="1024 .*or 1023"):
        check_denominator(1000)
    with pytest.raises(ValueError, match="1024 .*or 1023"):
        encode_box((0, 0, 1, 1), (10, 10), denominator=512)
    with pytest.raises(ValueError, match="image_size must be positive"):
        encode_box((0, 0, 1, 1), (0, 10))
    with pytest.raises(ValueError, match="image_size must be"):
        decode_loc((0, 0, 1, 1), "big")
    with pytest.raises(ValueError, match="0..1023"):
        loc_token(1024)
    assert loc_bin(1e9, 10) == 1023 and loc_bin(-1e9, 10) == 0


# (a, b, IoU)
IOU = [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
    ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),  # contained
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
    ((0, 0, 10, 10), (5, 5, 5, 9), 0.0),  # zero-width box
    ((0, 0, 10, 10), (8, 8, 2, 2), 0.0),  # inverted box counts as empty
    ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),  # empty union
    ((0.5, 0.5, 2.5, 1.5), (1.5, 0.5, 3.5, 1.5), 1 / 3),
]


@pytest.mark.parametrize("a,b,iou", IOU)
def test_iou_table(a, b, iou):
    assert math.isclose(box_iou(a, b), iou, abs_tol=1e-12)
    assert math.isclose(box_iou(b, a), iou, abs_tol=1e-12)


def test_one_definition_everywhere():
    from palikit.demo import shapes
    from palikit.eval import metrics, metrics_detection
    from palikit.tasks import parse

    assert tasks_box_iou is box_iou and metrics.box_iou is box_iou and metrics_detection.box_iou is box_iou
    assert parse.box_iou is box_iou
    s = shapes.Shape("circle", "red", (10.0, 20.0, 50.0, 60.0), None)
    assert shapes.detect_suffix([s], ["circle"], (112, 112)) == encode_box(s.box, (112, 112)) + " circle"
