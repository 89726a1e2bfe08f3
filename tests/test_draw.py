"""Drawing: box edges carry the label colour, masks are tinted, small images are upscaled by a whole
factor (boxes and masks with them) and labels grow with the output, PNGs are written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from palikit.tasks.draw import MAX_SIDE, MIN_SIDE, PALETTE, draw, label_colors, save_png, upscale_factor
from palikit.tasks.parse import Detection


def _det(label, box, score=None, mask=None) -> Detection:
    return Detection(label=label, box=box, loc=(0, 0, 1, 1), score=score, mask=mask)


@pytest.mark.parametrize("size", [(90, 60), (1600, 1200)])
def test_box_edges_labels_and_mask_tint(size):
    w, h = size
    image = Image.new("RGB", size, (128, 128, 128))
    mask = np.zeros((h, w), bool)
    mask[h // 2: h // 2 + h // 5, w // 10: w // 10 + w // 5] = True  # input pixels
    dets = [_det("dog", (0.2 * w, 0.3 * h, 0.8 * w, 0.9 * h), 0.91),
            _det("cat", (0.05 * w, 0.05 * h, 0.5 * w, 0.5 * h)),
            _det("cat", (0.0, 0.45 * h, 0.4 * w, 0.85 * h), mask=mask)]
    out = draw(image, dets)
    k = 1 if min(size) >= MIN_SIDE else -(-MIN_SIDE // min(size))  # 90x60 -> 8x (720x480); 1600x1200 kept
    assert out.size == (w * k, h * k) and out.mode == "RGB"
    arr = np.asarray(out)
    w, h = out.size  # from here on, output pixels
    colors = label_colors(dets)
    assert colors["dog"] != colors["cat"]
    # bottom edge of the dog box, away from labels: exactly the dog colour
    assert tuple(arr[int(0.9 * h) - 1, int(0.5 * w)]) == colors["dog"]
    # mask pixels are tinted towards the cat colour, pixels outside stay grey
    my, mx = int(0.6 * h), int(0.15 * w)
    tinted = arr[my, mx].astype(int)
    expected = np.round(0.55 * 128 + 0.45 * np.array(colors["cat"]))
    assert np.abs(tinted - expected).max() <= 1
    assert tuple(arr[int(0.95 * h), int(0.95 * w)]) == (128, 128, 128)
    # a label patch exists: dog colour pixels above the dog box (label drawn outside it)
    label_band = arr[max(int(0.3 * h) - 6, 0): int(0.3 * h) - 1, int(0.2 * w) + 2: int(0.2 * w) + 12]
    assert (label_band == colors["dog"]).all(axis=-1).any()
    assert np.array_equal(np.asarray(image), np.full((size[1], size[0], 3), 128))  # input untouched


def test_scores_change_the_label_and_colors_are_distinct():
    image = Image.new("RGB", (200, 200), "white")
    dets = [_det("dog", (20, 40, 180, 190), 0.5)]
    with_score = np.asarray(draw(image, dets))
    without = np.asarray(draw(image, dets, show_scores=False))
    assert not np.array_equal(with_score, without)
    many = [_det(f"c{i}", (0, 0, 10, 10)) for i in range(len(PALETTE))]
    assert len(set(label_colors(many).values())) == len(PALETTE)


def test_grayscale_input_and_empty_detections():
    image = Image.new("L", (30, 20), 50)
    out = draw(image, [])
    assert out.mode == "RGB" and out.size == (30 * 23, 20 * 23) and np.asarray(out).max() == 50  # 23 = ceil(448/20)
    assert draw(image, [], min_side=0).size == (30, 20)


def test_save_png_is_atomic_and_readable(tmp_path):
    image = draw(Image.new("RGB", (40, 30), "black"), [_det("x", (5, 5, 30, 25), 0.7)])
    path = save_png(image, tmp_path / "out" / "a.png")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_a_small_image_is_upscaled_with_its_boxes_masks_and_a_legible_label():
    from palikit.demo.shapes import make_sample

    sample = make_sample(0, seed=2_000_003, size=112)
    shape = sample.shapes[-1]
    d = _det(shape.cls, shape.box, 0.9, mask=shape.mask)
    out = np.asarray(draw(sample.image, [d]))
    assert upscale_factor((112, 112)) == 4 and out.shape == (448, 448, 3)
    color = label_colors([d])[shape.cls]
    x0, y0, x1, y1 = (int(v * 4) for v in shape.box)
    # the box edges sit at 4x the input coordinates
    assert (out[y1 - 1, x0 + 8: x1 - 8] == color).all()
    assert (out[y0 + 30: y1 - 8, x1 - 1] == color).all()
    # the mask lies on the upscaled pixel grid: 4x4 blocks of one tinted colour wherever the input mask is set
    big_mask = np.repeat(np.repeat(shape.mask, 4, 0), 4, 1)
    src = np.asarray(sample.image.resize((448, 448), Image.Resampling.NEAREST)).astype(int)
    inside = big_mask.copy()
    inside[: y0 + 30] = False  # leave out the label patch and the box outline
    inside[:, :x0 + 4] = inside[:, x1 - 4:] = False
    inside[y1 - 4:] = False
    assert inside.any()
    tint = np.round(0.55 * src[inside] + 0.45 * np.array(color))
    assert np.abs(out[inside].astype(int) - tint).max() <= 1
    below = ~big_mask & (np.arange(448)[:, None] > y1 + 4)  # away from the box: the upscaled image itself
    assert np.array_equal(out[below], src[below])
    # the label: a patch of the label colour holding text pixels of another colour, readable height
    # (a box on the image's top edge gets its label inside the box, just below y0)
    region = out[y0: y0 + 40, x0: x0 + 120] if y0 == 0 else out[max(y0 - 40, 0): y0, x0: x0 + 120]
    patch = (region == color).all(axis=-1)
    assert patch.sum() > 200, "no label patch"
    rows = np.nonzero(patch.any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 16, f"label only {rows.max() - rows.min() + 1} px tall at 448 px"
    band = region[rows.min(): rows.max() + 1]
    ink = ~(band == color).all(axis=-1) & (band.max(axis=-1) - band.min(axis=-1) < 60)  # white/black/grey text
    assert ink.sum() > 40, "the label patch holds no text pixels"


def test_label_text_grows_with_the_output():
    heights = {}
    for side in (112, 1200):
        image = Image.new("RGB", (side, side), (128, 128, 128))
        d = _det("dog", (0.2 * side, 0.5 * side, 0.8 * side, 0.9 * side), 0.5)
        out = np.asarray(draw(image, [d]))
        color = label_colors([d])["dog"]
        col = (out[: int(0.5 * out.shape[0]), int(0.2 * out.shape[1]) + 1] == color).all(axis=-1)
        rows = np.nonzero(col)[0]
        heights[out.shape[0]] = rows.max() - rows.min() + 1
    assert sorted(heights) == [448, 1200]
    assert heights[448] >= 16 and heights[1200] > 2 * heights[448], heights


def test_upscale_factor_keeps_the_long_side_bounded():
    assert upscale_factor((112, 112)) == 4 and upscale_factor((448, 300)) == 2 and upscale_factor((500, 448)) == 1
    assert upscale_factor((112, 112), min_side=0) == 1
    k = upscale_factor((2000, 20))
    assert k >= 1 and 2000 * k <= MAX_SIDE
    assert draw(Image.new("RGB", (2000, 20)), []).size == (2000 * k, 20 * k)
