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


def test_to_supervision_is_a_real_supervision_detections():
    import supervision as sv

    det = _result().to_supervision()
    assert isinstance(det, sv.Detections) and len(det) == 2
    assert det.xyxy.shape == (2, 4) and det.mask.shape == (2, 48, 64) and not det.mask[1].any()
    assert det.confidence is None  # one box has no score
    assert det.class_id.tolist() == [0, 1] and det.data["class_name"].tolist() == ["dog", "cat"]
    assert det[det.class_id == 0].xyxy.tolist() == [[12.5, 4.6875, 25.0, 14.0625]]  # supervision's own indexing
    scene = np.zeros((48, 64, 3), np.uint8)
    boxed = sv.BoxAnnotator(thickness=1).annotate(scene.copy(), det)
    masked = sv.MaskAnnotator(opacity=1.0).annotate(scene.copy(), det)
    assert boxed.any() and masked[5:20, 12:30].any() and not masked[30:, 40:].any()
    empty = Result(text="", image_size=(4, 3)).to_supervision()
    assert isinstance(empty, sv.Detections) and len(empty) == 0 and empty.mask is None


SEGS = "".join(f"<seg{i:03d}>" for i in range(16))
BOX = "<loc0100><loc0200><loc0300><loc0400>"
# (model output, image (w, h), how supervision's PaliGemma parser relates to palikit's)
OUTPUTS = [
    (f"{BOX} dog", (640, 480), "same"),
    ("<loc0000><loc0000><loc1023><loc1023> cat ; <loc0512><loc0256><loc0768><loc0700> traffic light", (640, 480), "same"),
    (f"{BOX} t-shirt ; {BOX} t-shirt", (333, 777), "same"),
    (f"detect: {BOX} café", (1, 1), "same"),
    ("<loc0000><loc1022><loc0001><loc1023> x", (1024, 1024), "same"),  # a sliver at the far edge
    # supervision's pattern wants a space right after the 4th <loc>: segmentation output has none
    (f"{BOX}{SEGS} dog", (640, 480), "supervision finds no box in segment output"),
    # its label pattern is [\w\s-]+: it stops at the apostrophe
    (f"{BOX} person's hat", (640, 480), "supervision cuts the label at punctuation"),
    # palikit drops a box with y1 <= y0 (and says so in Result.errors); supervision keeps it
    ("<loc0300><loc0200><loc0100><loc0400> dog", (640, 480), "palikit drops degenerate boxes"),
]


@pytest.mark.parametrize("text, size, relation", OUTPUTS)
def test_boxes_equal_supervisions_own_paligemma_parser(text, size, relation):
    import supervision as sv

    ours = Result(text=text, image_size=size, detections=parse_detections(text, size).detections).to_supervision()
    theirs = sv.Detections.from_vlm(sv.VLM.PALIGEMMA, text, resolution_wh=size)
    if relation == "same":
        assert len(ours) == len(theirs) > 0
        np.testing.assert_allclose(ours.xyxy, theirs.xyxy, rtol=0, atol=1e-4)
        assert ours.data["class_name"].tolist() == theirs.data["class_name"].tolist()
        # big_vision's RefCOCO convention (v / 1023): the same boxes scaled by 1024/1023, clipped to the image
        w, h = size
        d1023 = parse_detections(text, size, coord_denominator=1023).detections
        ours1023 = np.array([d.box for d in d1023])
        expected = np.minimum(theirs.xyxy * 1024 / 1023, [w, h, w, h])
        np.testing.assert_allclose(ours1023, expected, rtol=0, atol=1e-4)
    elif relation.startswith("supervision finds no box"):
        assert len(theirs) == 0 and len(ours) == 1 and ours.data["class_name"].tolist() == ["dog"]
    elif relation.startswith("supervision cuts"):
        np.testing.assert_allclose(ours.xyxy, theirs.xyxy, rtol=0, atol=1e-4)
        assert ours.data["class_name"].tolist() == ["person's hat"] and theirs.data["class_name"].tolist() == ["person"]
    else:
        assert len(ours) == 0 and len(theirs) == 1


def test_label_filter_matches_supervisions_classes_argument():
    import supervision as sv

    text, size = OUTPUTS[1][:2]
    theirs = sv.Detections.from_vlm(sv.VLM.PALIGEMMA, text, resolution_wh=size, classes=["cat"])
    parsed = parse_detections(text, size, requested_labels=["cat"]).detections
    ours = [d for d in parsed if d.requested]  # palikit keeps unrequested boxes, flagged
    assert [d.label for d in ours] == theirs.data["class_name"].tolist() == ["cat"]
    np.testing.assert_allclose([d.box for d in ours], theirs.xyxy, rtol=0, atol=1e-4)


def test_detection_dataclass_defaults():
    d = Detection(label="x", box=(0.0, 0.0, 1.0, 1.0), loc=(0, 0, 1, 1))
    assert d.score is None and d.mask is None and d.requested and d.seg_tokens is None and d.mask_score is None
