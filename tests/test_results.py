"""Result: JSON round trip, COCO results format, COCO RLE (against pycocotools-made fixtures), supervision."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from palikit.tasks import Detection, Result, mask_to_rle, parse_detections, rle_to_mask


def _result() -> Result:
    text = "<loc0100><loc0200><loc0300><loc0400> dog ; <loc0000><loc0000><loc1023><loc1023> cat"
    parsed = parse_detections(text, (64, 48), requested_labels=["dog"])
    mask = np.zeros((48, 64), bool)
    mask[5:20, 12:30] = True
    parsed.detections[0].mask = mask
    parsed.detections[0].score = 0.875
    return Result(text=text, prompt="detect dog", image_size=(64, 48), detections=parsed.detections,
                  errors=["instance 3: only 2 of 4 <loc> tokens"], timings={"prefill_ms": 12.3456789},
                  tokens=[256100, 256200, 5], token_logprobs=[-0.1, -0.2, -0.3], hint=None)


def test_json_round_trip():
    r = _result()
    data = json.loads(r.to_json())
    assert data["detections"][0]["box"] == [12.5, 4.69, 25.0, 14.06]  # rounded to 0.01 px
    assert data["detections"][0]["mask"]["size"] == [48, 64]
    assert data["detections"][1]["mask"] is None and data["detections"][1]["requested"] is False
    assert data["timings"] == {"prefill_ms": 12.346}
    back = Result.from_json(r.to_json())
    assert back.to_dict() == r.to_dict()
    assert np.array_equal(back.detections[0].mask, r.detections[0].mask)
    assert back.detections[0].loc == (100, 200, 300, 400) and back.detections[0].score == 0.875
    assert back.image_size == (64, 48) and back.tokens == r.tokens and back.errors == r.errors


def test_to_coco_results_format():
    r = _result()
    entries = r.to_coco(image_id=7, category_ids={"Dog": 1, "cat": 2})
    assert [e["category_id"] for e in entries] == [1, 2]
    dog, cat = entries
    assert dog["image_id"] == 7 and dog["bbox"] == [12.5, 4.69, 12.5, 9.38] and dog["score"] == 0.875
    assert set(dog["segmentation"]) == {"size", "counts"} and isinstance(dog["segmentation"]["counts"], str)
    assert np.array_equal(rle_to_mask(dog["segmentation"]), r.detections[0].mask)
    assert cat["score"] == 1.0 and "segmentation" not in cat
    assert cat["bbox"][2] == pytest.approx(1023 / 1024 * 64, abs=0.01)
    assert r.to_coco(1, {"horse": 3}) == []
    json.dumps(entries)


# Fixtures produced once with pycocotools 2.0 `mask.encode` (column-major, compressed counts).
_SMALL = np.zeros((5, 7), bool)
_SMALL[1:4, 2:5] = True
_SMALL[0, 6] = True
_SMALL[4, 0] = True


def test_rle_matches_pycocotools_fixture():
    assert mask_to_rle(_SMALL) == {"size": [5, 7], "counts": [4, 1, 6, 3, 2, 3, 2, 3, 6, 1, 4]}
    assert mask_to_rle(_SMALL, compressed=True)["counts"] == "4162L0004NN"
    assert np.array_equal(rle_to_mask({"size": [5, 7], "counts": b"4162L0004NN"}), _SMALL)
    big = np.zeros((300, 200), bool)
    big[10:290, 20:180] = True
    big[100:120, 50:60] = False
    enc = mask_to_rle(big, compressed=True)["counts"]
    assert enc.startswith("jk5h8d00000") and enc.endswith("0Vk5") and "RJ0`20`M0`20`M" in enc
    assert np.array_equal(rle_to_mask({"size": [300, 200], "counts": enc}), big)


@pytest.mark.parametrize("seed", range(12))
def test_rle_round_trip_random(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 60, 2)
    mask = rng.random((h, w)) < rng.random()
    if seed == 0:
        mask[:] = True  # starts with ones: counts begin with a zero-length run
    if seed == 1:
        mask[:] = False
    rle = mask_to_rle(mask)
    assert sum(rle["counts"]) == h * w and rle["size"] == [h, w]
    assert rle["counts"][0] == (0 if mask.T.ravel()[0] else rle["counts"][0])
    assert np.array_equal(rle_to_mask(rle), mask)
    assert np.array_equal(rle_to_mask(mask_to_rle(mask, compressed=True)), mask)
    assert np.array_equal(rle_to_mask(json.loads(json.dumps(rle))), mask)


def test_rle_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="sum to"):
        rle_to_mask({"size": [2, 2], "counts": [1, 1]})


def test_str_lists_each_detection():
    s = str(_result())
    lines = s.splitlines()
    assert lines[0].startswith("'detect dog' -> ")
    assert "dog: box (12, 5, 25, 14)" in lines[1] and "score 0.88" in lines[1] and "mask 270 px" in lines[1]
    assert "cat" in lines[2] and "not requested" in lines[2]
    assert "error:" in lines[3]


def test_to_supervision_without_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # import now fails as if not installed
    with pytest.raises(ImportError, match="pip install supervision"):
        _result().to_supervision()


def test_to_supervision_with_a_stub_module(monkeypatch):
    import types

    stub = types.ModuleType("supervision")

    class Detections:  # the keyword interface of supervision.Detections
        def __init__(self, xyxy, mask=None, confidence=None, class_id=None, data=None):
            self.xyxy, self.mask, self.confidence, self.class_id, self.data = xyxy, mask, confidence, class_id, data

    stub.Detections = Detections
    monkeypatch.setitem(sys.modules, "supervision", stub)
    det = _result().to_supervision()
    assert det.xyxy.shape == (2, 4) and det.mask.shape == (2, 48, 64) and not det.mask[1].any()
    assert det.confidence is None  # one box has no score
    assert det.class_id.tolist() == [0, 1] and det.data["class_name"].tolist() == ["dog", "cat"]
    empty = Result(text="", image_size=(4, 3)).to_supervision()
    assert empty.xyxy.shape == (0, 4) and empty.mask is None


def test_detection_dataclass_defaults():
    d = Detection(label="x", box=(0.0, 0.0, 1.0, 1.0), loc=(0, 0, 1, 1))
    assert d.score is None and d.mask is None and d.requested and d.seg_tokens is None and d.mask_score is None
