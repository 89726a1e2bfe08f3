"""The shapes v2 generator (issue 19): deterministic by seed, shapes at free positions (not v1's grid),
every class and background, masks that match their boxes and respect occlusion, referring expressions
that name the right instance, empty targets for absent classes, any image size. The written splits and
the hand-made test set: lab/tests/test_demo_data.py."""

from __future__ import annotations

import numpy as np
import pytest

from palikit.demo import shapes, shapes2
from palikit.demo.backgrounds import background
from palikit.demo.shapes2 import CLASSES, Shape2, color_name, examples, make_sample, referring
from palikit.tasks.boxes import encode_box


@pytest.fixture(scope="module")
def samples():
    return [make_sample(i, 0) for i in range(160)]


def _ks_uniform(u) -> float:
    """Kolmogorov-Smirnov distance between the sample `u` (values in 0..1) and U(0, 1)."""
    u = np.sort(np.asarray(u, float))
    n = len(u)
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def test_same_seed_same_sample_other_seed_other_sample():
    a, b, c = make_sample(7, 0), make_sample(7, 0), make_sample(7, 1)
    assert a.image.tobytes() == b.image.tobytes() and a.image.size == b.image.size
    assert [(s.cls, s.color, s.box) for s in a.shapes] == [(s.cls, s.color, s.box) for s in b.shapes]
    assert all((s.mask == t.mask).all() for s, t in zip(a.shapes, b.shapes))
    assert a.word == b.word
    assert a.image.size != c.image.size or a.image.tobytes() != c.image.tobytes()


def test_free_positions_are_uniform_not_a_grid():
    """Where the first shape of an image may go, it goes uniformly: x0 / (w - box width) ~ U(0, 1)
    (KS distance under the 1 % critical value 1.63 / sqrt(n)); v1's grid fails the same check."""
    def offsets(sample_list):
        us, vs = [], []
        for s in sample_list:
            w, h = s.image.size
            x0, y0, x1, y1 = s.shapes[0].box
            us.append(x0 / max(w - (x1 - x0), 1))
            vs.append(y0 / max(h - (y1 - y0), 1))
        return np.clip(us, 0, 1), np.clip(vs, 0, 1)

    n = 400  # the test split's seed (seed 3's first 300 gave D = 0.115 > 0.094, a 1 % fluke: 0.055 over 900)
    u, v = offsets([make_sample(i, shapes2.SPLIT_SEEDS["test"], word_prob=0.0) for i in range(n)])
    crit = 1.63 / np.sqrt(n)
    assert _ks_uniform(u) < crit and _ks_uniform(v) < crit, (_ks_uniform(u), _ks_uniform(v), crit)
    u1, v1 = offsets([shapes.make_sample(i, 2_000_003, word_prob=0.0) for i in range(n)])
    assert _ks_uniform(u1) > 2 * crit  # the check can fail: the grid's offsets are a few values
    assert len({round(x, 2) for x in u}) >= 90 and len({round(x, 2) for x in u1}) <= 12  # of 101


def test_box_centres_cover_the_whole_image(samples):
    cx = [((s.box[0] + s.box[2]) / 2) / smp.image.size[0] for smp in samples for s in smp.shapes]
    cy = [((s.box[1] + s.box[3]) / 2) / smp.image.size[1] for smp in samples for s in smp.shapes]
    for c in (cx, cy):
        hist = np.histogram(c, bins=8, range=(0, 1))[0]
        assert hist.min() >= 0.03 * len(c), hist  # no empty band, edges included


def test_every_class_colour_background_size_and_font_appears(samples):
    assert {s.cls for smp in samples for s in smp.shapes} == set(CLASSES)
    assert {s.color for smp in samples for s in smp.shapes} == set(shapes2.COLOR_NAMES)
    import random

    kinds = {background(random.Random(i), 64, 48)[1] for i in range(80)}
    assert kinds == {"plain", "gradient", "noise", "stripes", "checker", "field", "clutter"}
    sizes = [smp.image.size for smp in samples]
    assert min(min(s) for s in sizes) < 120 and max(max(s) for s in sizes) > 500
    assert any(w > 1.8 * h for w, h in sizes) and any(h > 1.8 * w for w, h in sizes)
    assert sum(smp.word is not None for smp in samples) > 0.35 * len(samples)
    assert len(shapes2.usable_fonts()) >= 5 and all("Display" not in f.name for f in shapes2.usable_fonts())
    assert {len(smp.shapes) for smp in samples} >= {1, 2, 3, 4, 5, 6}


def test_extra_classes_draw_when_asked():
    got = [make_sample(i, 5, classes=shapes2.EXTRA_CLASSES) for i in range(20)]
    assert {s.cls for smp in got for s in smp.shapes} == set(shapes2.EXTRA_CLASSES)
    ring = next(s for smp in got for s in smp.shapes if s.cls == "ring" and (s.mask == s.full_mask).all())
    x0, y0, x1, y1 = (int(v) for v in ring.box)
    assert not ring.mask[(y0 + y1) // 2, (x0 + x1) // 2]  # a ring's hole is not part of its mask


def test_masks_match_boxes_and_respect_occlusion(samples):
    overlaps = 0
    for smp in samples:
        w, h = smp.image.size
        arr = np.asarray(smp.image, np.float32)
        for i, s in enumerate(smp.shapes):
            ys, xs = np.nonzero(s.mask)
            assert abs(xs.min() - s.box[0]) <= 1 and abs(ys.min() - s.box[1]) <= 1
            assert abs(xs.max() + 1 - s.box[2]) <= 1 and abs(ys.max() + 1 - s.box[3]) <= 1
            assert 0 <= s.box[0] < s.box[2] <= w and 0 <= s.box[1] < s.box[3] <= h
            assert s.mask.sum() >= 0.6 * s.full_mask.sum() and not (s.mask & ~s.full_mask).any()
            for later in smp.shapes[i + 1:]:
                assert not (s.mask & later.full_mask).any()  # a later shape hides what it covers
                shared = s.full_mask & later.full_mask
                if shared.sum() > 40:
                    overlaps += 1
                    # the pixels both would cover show the later one's colour
                    seen = np.median(arr[shared], axis=0)
                    assert np.abs(seen - later.rgb).max() < 40, (seen, later.rgb, s.rgb)
            inner = s.mask & np.roll(s.mask, 2, 0) & np.roll(s.mask, -2, 0) & np.roll(s.mask, 2, 1) & \
                np.roll(s.mask, -2, 1)
            if inner.sum() > 20:
                assert np.abs(np.median(arr[inner], axis=0) - s.rgb).max() < 30
                assert color_name(np.median(arr[inner], axis=0)) == s.color
    assert overlaps >= 10


def test_colour_ranges_hold_v1_colours_and_exclude_backgrounds():
    assert {name: color_name(rgb) for name, rgb in shapes.COLORS.items()} == {n: n for n in shapes.COLORS}
    assert color_name((128, 128, 128)) is None and color_name((255, 255, 255)) is None
    import random

    for i in range(40):  # no background pixel falls in a colour name's range
        arr, _ = background(random.Random(i), 48, 32)
        assert all(color_name(px) is None for px in arr.reshape(-1, 3)[::7])


def _shape(cls, color, box, w=200, h=100):
    m = np.zeros((h, w), bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return Shape2(cls, color, tuple(float(v) for v in box), m, full_mask=m.copy())


def test_referring_expressions_name_the_right_instance():
    red, blue = _shape("circle", "red", (10, 10, 30, 30)), _shape("circle", "blue", (100, 50, 160, 90))
    sq_small, sq_big = _shape("square", "red", (40, 60, 50, 70)), _shape("square", "green", (170, 5, 195, 30))
    ex = referring([red, blue, sq_small, sq_big], (200, 100))
    assert ex["the red circle"] == [red] and ex["the blue circle"] == [blue] and ex["the green circle"] == []
    assert ex["the largest circle"] == [blue] and ex["the smallest circle"] == [red]
    assert ex["the leftmost circle"] == [red] and ex["the rightmost circle"] == [blue]
    assert ex["the largest square"] == [sq_big] and ex["the green shape"] == [sq_big]
    assert "the red shape" not in ex  # two red shapes: ambiguous, never asked
    twins = [_shape("star", "red", (10, 10, 30, 30)), _shape("star", "red", (12, 60, 33, 80))]
    ex = referring(twins, (200, 100))
    assert "the red star" not in ex and "the largest star" not in ex  # same colour, about the same size
    assert "the leftmost star" not in ex and ex["the bottommost star"] == [twins[1]]


def test_referring_rows_and_absent_classes_give_the_right_targets(samples):
    import random

    rng = random.Random(0)
    seen = {"refer_present": 0, "refer_absent": 0, "detect_absent": 0}
    for smp in samples:
        size = smp.image.size
        for row in examples(smp, rng, seg_fn=lambda s: [1] * 16):
            if row["task"] in ("refer_detect", "refer_segment"):
                expr = row["prefix"].split(" ", 1)[1]
                target = referring(smp.shapes, size)[expr]
                if target:
                    assert row["suffix"].startswith(encode_box(target[0].box, size)) and row["suffix"].endswith(
                        " " + expr) and row["box"] == list(target[0].box)
                    cls = expr.split()[-1]
                    assert target[0].cls == cls or (cls == "shape" and target[0].color == expr.split()[1])
                    seen["refer_present"] += 1
                else:
                    assert row["suffix"] == "" and row["box"] is None
                    seen["refer_absent"] += 1
            if row["task"] == "detect":
                asked = row["prefix"][len("detect "):].split(" ; ")
                n = sum(s.cls in asked for s in smp.shapes)
                assert row["suffix"].count("<loc") == 4 * n
                if n == 0:
                    assert row["suffix"] == ""
                    seen["detect_absent"] += 1
    assert min(seen.values()) >= 10, seen


def test_targets_are_canonical():
    smp = make_sample(11, 0)
    rows_a = examples(smp, __import__("random").Random(4))
    rows_b = examples(smp, __import__("random").Random(4))
    assert rows_a == rows_b
    for s in [shapes.make_sample(i, 0) for i in range(30)]:  # v1's caption rule, over more classes
        assert shapes2.caption(s.shapes) == shapes.caption(s.shapes)
    a, b = _shape("circle", "red", (50, 10, 60, 20)), _shape("square", "red", (10, 12, 20, 22))
    for size in ((200, 100), (800, 400)):  # the order of <loc> bins, the same at any pixel size
        assert shapes2.detect_suffix([b, a], ["circle", "square"], size).endswith("square")


@pytest.mark.parametrize("size", [(80, 640), (640, 80), (97, 211), 32, (400, 400)])
def test_any_image_size(size):
    smp = make_sample(2, 0, size=size)
    w, h = (size, size) if isinstance(size, int) else size
    assert smp.image.size == (w, h) and smp.shapes
    for s in smp.shapes:
        assert s.mask.shape == (h, w) and 0 <= s.box[0] < s.box[2] <= w and 0 <= s.box[1] < s.box[3] <= h


def test_a_tiny_image_always_holds_a_shape():
    """At 32 px a word can leave no room for any shape: the sample is then drawn without the word
    (with some installed fonts index 2 at 32x32 came out with a word and no shape)."""
    samples = [make_sample(i, 0, size=size) for size in (32, (32, 48), (48, 32)) for i in range(60)]
    assert all(s.shapes for s in samples)
    assert any(s.word for s in samples) and any(not s.word for s in samples)
    for s in samples:
        if s.word:
            assert all(not (s.text_box[0] < sh.box[2] and sh.box[0] < s.text_box[2] and s.text_box[1] < sh.box[3]
                            and sh.box[1] < s.text_box[3]) for sh in s.shapes), s.index  # never on the word


def test_too_small_an_image_says_so():
    with pytest.raises(ValueError, match="at least 32x32"):
        make_sample(0, 0, size=(20, 300))
    with pytest.raises(ValueError, match="split must be one of"):
        list(shapes2.iter_split("dev", 1))
