"""Drawing: box edges carry the label colour, masks are tinted, size is kept, PNGs are written atomically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from palikit.tasks.draw import PALETTE, draw, label_colors, save_png
from palikit.tasks.parse import Detection


def _det(label, box, score=None, mask=None) -> Detection:
    return Detection(label=label, box=box, loc=(0, 0, 1, 1), score=score, mask=mask)


@pytest.mark.parametrize("size", [(90, 60), (1600, 1200)])
def test_box_edges_labels_and_mask_tint(size):
    w, h = size
    image = Image.new("RGB", size, (128, 128, 128))
    mask = np.zeros((h, w), bool)
    mask[h // 2: h // 2 + h // 5, w // 10: w // 10 + w // 5] = True
    dets = [_det("dog", (0.2 * w, 0.3 * h, 0.8 * w, 0.9 * h), 0.91),
            _det("cat", (0.05 * w, 0.05 * h, 0.5 * w, 0.5 * h)),
            _det("cat", (0.0, 0.45 * h, 0.4 * w, 0.85 * h), mask=mask)]
    out = draw(image, dets)
    assert out.size == image.size and out.mode == "RGB"
    arr = np.asarray(out)
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
    assert np.array_equal(np.asarray(image), np.full((h, w, 3), 128))  # input untouched


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
    assert out.mode == "RGB" and out.size == (30, 20) and np.asarray(out).max() == 50


def test_save_png_is_atomic_and_readable(tmp_path):
    image = draw(Image.new("RGB", (40, 30), "black"), [_det("x", (5, 5, 30, 25), 0.7)])
    path = save_png(image, tmp_path / "out" / "a.png")
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
