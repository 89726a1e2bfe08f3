"""COCO mask encodings in their one home (`tasks/rle.py`): RLE equal to pycocotools' own in both
forms, and a COCO `segmentation` (polygons, list RLE, compressed RLE) decoded as pycocotools does,
with and without pycocotools installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from palikit.tasks.rle import mask_to_rle, rle_to_mask, segmentation_to_mask


def _masks():
    rng = np.random.default_rng(0)
    out = [np.zeros((4, 5), bool), np.ones((3, 2), bool), rng.random((37, 23)) > 0.5]
    blob = np.zeros((60, 80), bool)
    blob[10:40, 5:70] = True
    blob[20:25, 30:35] = False
    return out + [blob, blob.T.copy()]


@pytest.mark.parametrize("i", range(5))
def test_rle_equals_pycocotools(i):
    m = _masks()[i]
    theirs = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    ours = mask_to_rle(m, compressed=True)
    assert ours["size"] == [int(v) for v in theirs["size"]]
    assert ours["counts"] == theirs["counts"].decode("ascii")
    assert np.array_equal(rle_to_mask(theirs), m)
    assert np.array_equal(coco_mask.decode({"size": ours["size"], "counts": ours["counts"].encode()}), m)
    plain = mask_to_rle(m)
    assert np.array_equal(rle_to_mask(plain), m)
    assert np.array_equal(coco_mask.decode(coco_mask.frPyObjects(plain, *plain["size"])), m)


POLY = [[10, 20, 30, 20, 30, 30, 10, 30]]  # x, y pairs: a 20 x 10 rectangle


@pytest.mark.parametrize("coco_tools", [True, False])
def test_segmentation_to_mask(monkeypatch, coco_tools):
    blob = _masks()[3]
    if not coco_tools:  # the dependency-free path: polygons with PIL, RLE in NumPy
        monkeypatch.setitem(sys.modules, "pycocotools", None)
    assert np.array_equal(segmentation_to_mask(mask_to_rle(blob), 60, 80), blob)
    assert np.array_equal(segmentation_to_mask(mask_to_rle(blob, compressed=True), 60, 80), blob)
    poly = segmentation_to_mask(POLY, 50, 50)
    assert poly.dtype == bool and poly.shape == (50, 50)
    assert poly[21:29, 11:29].all() and not poly[:19].any() and not poly[:, :9].any() and not poly[32:].any()
    monkeypatch.undo()
    reference = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(POLY, 50, 50))).astype(bool)
    if coco_tools:
        assert np.array_equal(poly, reference)
    else:  # PIL's rasteriser differs from COCO's only on the outline
        assert (poly != reference).sum() <= 2 * (20 + 10) + 4


def test_segmentation_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"size \[3, 2\] differs from the image's \[height, width\] \[2, 3\]"):
        segmentation_to_mask({"size": [3, 2], "counts": [6]}, 2, 3)
    with pytest.raises(ValueError, match="counts sum to 5"):
        segmentation_to_mask({"size": [3, 2], "counts": [1, 4]}, 3, 2)
    with pytest.raises(ValueError, match="end inside a number"):
        rle_to_mask({"size": [3, 2], "counts": "abc"})  # every character says "more follows"
    with pytest.raises(ValueError, match="not one of COCO's characters"):
        rle_to_mask({"size": [3, 2], "counts": "6~"})
    with pytest.raises(ValueError, match="non-negative"):
        rle_to_mask({"size": [3, 2], "counts": [8, -2]})
    with pytest.raises(ValueError, match="list of polygons or an RLE dict"):
        segmentation_to_mask("not a mask", 3, 2)
