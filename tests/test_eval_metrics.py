"""Metrics checked against hand-computed values and the reference implementations."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from palikit.eval import metrics as M
from palikit.tasks.records import coco_results


# ------------------------------------------------------------------------------ OCR
def test_edit_distance_hand_computed():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("", "abc") == 3
    assert M.edit_distance("flaw", "lawn") == 2
    assert M.normalized_edit_distance("", "") == 0.0
    assert M.ocr_accuracy("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert M.ocr_accuracy("", "") == 1.0
    assert M.ocr_accuracy("abc", "") == 0.0


def test_cer_and_exact_match():
    assert M.cer("sitting", "kitten") == pytest.approx(3 / 6)
    assert M.cer("", "") == 0.0
    assert M.cer("ab", "") == 2.0
    assert M.corpus_cer(["abc", "xy"], ["abd", "xy"]) == pytest.approx(1 / 5)
    assert M.exact_match("Hello  World ", "hello world") == 0.0
    assert M.exact_match("Hello  World ", "hello world", normalize=True) == 1.0
    assert M.ocr_accuracy("HELLO", "hello", normalize=True) == 1.0


# ------------------------------------------------------------------------------ ANLS
def test_anls_worked_examples():
    assert M.anls("hello", ["hello"]) == 1.0
    assert M.anls("hallo", ["hello"]) == pytest.approx(0.8)  # NL = 1/5
    assert M.anls("help", ["hello"]) == pytest.approx(0.6)  # NL = 2/5
    assert M.anls("hel", ["hello"]) == pytest.approx(0.6)  # 2 deletions, max len 5
    assert M.anls("he", ["hello"]) == 0.0  # NL = 3/5 >= 0.5


def test_anls_threshold_and_max_over_answers():
    assert M.anls("xyz", ["hello"]) == 0.0
    assert M.anls("abcde", ["abxyz"]) == 0.0  # NL = 3/5 >= 0.5
    assert M.anls("abcd", ["abcz"]) == pytest.approx(0.75)
    assert M.anls("abcd", ["zzzz", "abcz", "abcd"]) == 1.0
    assert M.anls("HELLO ", ["hello"]) == 1.0
    assert M.anls("HELLO", ["hello"], lowercase=False) == 0.0
    assert M.anls("", [""]) == 1.0 and M.anls("a", [""]) == 0.0


# ------------------------------------------------------------------------------ VQA
def test_vqa_normalize_official_rules():
    assert M.vqa_normalize("The dog's.") == "dog's"
    assert M.vqa_normalize("a cat, dog") == "cat dog"
    assert M.vqa_normalize("1,000") == "1000"
    assert M.vqa_normalize("hot-dog") == "hot dog"
    assert M.vqa_normalize("dont") == "don't"
    assert M.vqa_normalize("3.5") == "3.5"
    assert M.vqa_normalize("Yes.") == "yes"
    assert M.vqa_normalize("Two") == "2"
    assert M.vqa_normalize("none") == "0"
    assert M.vqa_normalize("an apple") == "apple"


def test_vqa_accuracy_leave_one_out():
    assert M.vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert M.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert M.vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert M.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx((0 + 9 / 3) / 10)
    assert M.vqa_accuracy("maybe", ["yes"] * 10) == 0.0
    # normalisation only when the humans disagree (official quirk):
    assert M.vqa_accuracy("two", ["2"] * 10) == 0.0
    assert M.vqa_accuracy("Two.", ["2"] * 4 + ["3"] * 6) == 1.0
    assert M.vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0


# ------------------------------------------------------------------------------ CIDEr
def test_cider_hand_computed():
    # Two images with disjoint vocabularies: every n-gram has df = 1, idf = log 2; a candidate equal to
    # its single reference has cosine 1 for each n and no length penalty -> 10.
    score, per = M.cider_d(["a black cat sits", "the red bus drives"],
                           [["a black cat sits"], ["the red bus drives"]])
    assert per == pytest.approx([10.0, 10.0]) and score == pytest.approx(10.0)
    # A word every reference contains has idf 0; a disjoint candidate scores 0.
    score, per = M.cider_d(["zebra", "the red bus drives"], [["a black cat sits"], ["the red bus drives"]])
    assert per[0] == 0.0 and per[1] == pytest.approx(10.0)


def test_cider_unigram_only_by_hand():
    # Candidate "cat dog" vs reference "cat bird" (image 1) and "fish" (image 2): df(cat)=df(bird)=1,
    # idf = log 2; n=1: hyp vec {cat: l, dog: l}, ref {cat: l, bird: l}; cos = l^2 / (sqrt2 l * sqrt2 l) = .5;
    # bigram counts: 1 vs 1 -> delta 0. score = 10 * 0.5 / n (n=1).
    score, per = M.cider_d(["cat dog", "fish"], [["cat bird"], ["fish"]], n=1)
    assert per[0] == pytest.approx(5.0)


def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider import cider  # a test dependency: the cross-check always runs
    preds = ["a man riding a horse on a beach", "two dogs play in the snow", "a plate of food",
             "a red car parked on a street"]
    refs = [["a man rides a horse along the beach", "a person on a horse at the beach", "horse and rider"],
            ["two dogs playing in snow", "dogs running through the snow"],
            ["a plate with food on it", "a dinner plate of vegetables and meat", "food on a plate"],
            ["a red car on the street", "a parked red car", "a car parked near the curb"]]
    res = {i: [p] for i, p in enumerate(preds)}
    gts = {i: r for i, r in enumerate(refs)}
    ref_score, ref_per = cider.Cider().compute_score(gts, res)
    score, per = M.cider_d(preds, refs, tokenize=False)
    assert score == pytest.approx(ref_score, rel=1e-9)
    assert per == pytest.approx(list(ref_per), rel=1e-9)


def test_caption_tokenize_drops_punctuation():
    assert M.caption_tokenize("A dog, running.  Fast!") == ["a", "dog", "running", "fast"]
    assert M.caption_tokenize("the dog's ball") == ["the", "dog", "'s", "ball"]
    assert M.caption_tokenize("don't stop") == ["do", "n't", "stop"]


# ------------------------------------------------------------------------------ counting
@pytest.mark.parametrize("text,want", [
    ("3", 3), ("there are 12 dogs", 12), ("1,000", 1000), ("three", 3), ("Twenty-one", 21),
    ("twenty one", 21), ("forty", 40), ("no", 0), ("none", 0), ("zero", 0), ("a dozen", 12), ("many", None),
    ("", None),
])
def test_parse_count(text, want):
    assert M.parse_count(text) == want


def test_count_accuracy():
    assert M.count_accuracy("three", "3") == 1.0
    assert M.count_accuracy("3", 3) == 1.0
    assert M.count_accuracy("4", "3") == 0.0
    assert M.count_accuracy("lots", "3") == 0.0


# ------------------------------------------------------------------------------ COCO detection
def _gt():
    return {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 50], "area": 3000, "iscrowd": 0},
        ],
    }


def test_coco_map_perfect_is_one():
    import pycocotools  # noqa: F401 - a test dependency
    gt = _gt()
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
           for a in gt["annotations"]]
    out = M.coco_map(gt, res)
    assert out["map"] == pytest.approx(1.0) and out["map50"] == pytest.approx(1.0)
    assert M.coco_map(gt, [])["map"] == 0.0


def test_coco_map_equals_pycocotools_own_result():
    import pycocotools  # noqa: F401 - a test dependency
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _gt()
    cats = {"cat": 1, "dog": 2}
    dets_img1 = [{"label": "cat", "box": (12, 11, 50, 52), "score": 0.9},  # IoU ~0.86
                 {"label": "Dog", "box": (60, 60, 90, 90), "score": 0.8},  # IoU ~0.29 -> miss at .5
                 {"label": "dog", "box": (50, 50, 79, 81), "score": 0.4},  # good but low score
                 {"label": "horse", "box": (0, 0, 5, 5), "score": 0.99}]  # unknown label: dropped
    dets_img2 = [{"label": "cat", "box": (0, 0, 60, 40), "score": None}]  # IoU 0.8, score -> 1.0
    res = coco_results(1, dets_img1, cats, masks="none") + coco_results(2, dets_img2, cats, masks="none")
    assert len(res) == 4 and res[-1]["score"] == 1.0 and res[0]["bbox"] == [12.0, 11.0, 38.0, 41.0]
    ours = M.coco_map(gt, res)

    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = _gt()
        cgt.createIndex()
        ev = COCOeval(cgt, cgt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["map"] == pytest.approx(ev.stats[0]) and ours["map50"] == pytest.approx(ev.stats[1])
    assert ours["map75"] == pytest.approx(ev.stats[2])
    assert 0 < ours["map"] < 1
    # By hand at IoU .5: cat AP = 1 (both found, top scores); dog: the FP (0.8) ranks above the TP (0.4):
    # precision at recall 1 is 0.5 -> AP .5; mean = 0.75.
    assert ours["map50"] == pytest.approx(0.75, abs=1e-6)
    # per class (issue 37): cat 1.0 and dog 0.5 at IoU .5, their mean the map50 above; each class's AP
    # equals pycocotools' on that class alone
    per = M.coco_map(gt, res, per_class=True)
    assert per["class/cat/map50"] == pytest.approx(1.0) and per["class/dog/map50"] == pytest.approx(0.5)
    for name, cid in cats.items():
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(cgt, cgt.loadRes(res), "bbox")
            ev.params.catIds = [cid]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert per[f"class/{name}/map"] == pytest.approx(ev.stats[0])
    # no object is larger than 96x96 px: COCO's -1 is None (not defined), never a -1 / -100 in a report
    assert ours["map_large"] is None and ours["map_medium"] is not None
    assert M.coco_map(gt, [])["map_large"] is None and M.coco_map(gt, [])["map_medium"] == 0.0


# ------------------------------------------------------------------------------ segmentation
def _masks():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True  # 16 px, box (2, 2, 6, 6)
    half = np.zeros((10, 10), bool)
    half[2:6, 2:4] = True  # 8 px inside -> IoU .5
    return gt, half


def test_mask_iou_hand_made():
    gt, half = _masks()
    assert M.mask_iou(gt, gt) == 1.0
    assert M.mask_iou(half, gt) == pytest.approx(0.5)
    assert M.mask_iou(None, gt) == 0.0
    assert M.mask_iou(np.zeros((3, 3), bool), gt) == 0.0  # wrong shape = invalid


def test_referring_segmentation_invalid_scores_zero():
    gt, half = _masks()
    gtb = (2, 2, 6, 6)
    out = M.referring_segmentation_scores(
        pred_masks=[gt, half, None, gt],
        pred_boxes=[(2, 2, 6, 6), (2, 2, 4, 6), (2, 2, 6, 6), (5, 5, 5, 9)],  # last box degenerate -> invalid
        gt_masks=[gt] * 4, gt_boxes=[gtb] * 4)
    assert out["ious"] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert out["miou"] == pytest.approx(1.5 / 4)
    assert out["invalid"] == 2 and out["total"] == 4
    # box IoUs: 1, .5, 1, 0 -> >=.5: 3/4 ; >=.75: 2/4
    assert out["boxacc/0.5"] == pytest.approx(0.75) and out["boxacc/0.75"] == pytest.approx(0.5)
    assert M.segmentation_sample_iou([], gt) == 0.0
    assert M.segmentation_sample_iou([{"label": "x", "box": (2, 2, 4, 6), "mask": half}], gt) == pytest.approx(.5)
    assert math.isnan(M.referring_segmentation_scores([], [], [], [])["miou"])
