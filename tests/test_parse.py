"""Parsing generated detect/segment text: a supervision-style edge-case table, a fuzz test, confidences, dedupe."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palikit.tasks.parse import Detection, dedupe, detections_from_ids, parse_detections

W, H = 1024, 512  # non-square on purpose: x scales by W, y by H
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


def loc(*vs: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in vs)


# (case id, text, requested labels, expected (label, loc, has_seg, requested) per detection, error substrings)
CASES = [
    ("single box", loc(100, 200, 300, 400) + " dog", ["dog"], [("dog", (100, 200, 300, 400), False, True)], []),
    ("multi-class", loc(0, 0, 512, 512) + " cat ; " + loc(10, 20, 30, 40) + " dog", ["cat", "dog"],
     [("cat", (0, 0, 512, 512), False, True), ("dog", (10, 20, 30, 40), False, True)], []),
    ("no space before label", loc(1, 2, 3, 4) + "dog;" + loc(5, 6, 7, 8) + "cat", None,
     [("dog", (1, 2, 3, 4), False, True), ("cat", (5, 6, 7, 8), False, True)], []),
    ("punctuation kept", loc(1, 2, 3, 4) + " t-shirt ; " + loc(1, 2, 3, 4) + " mr. smith's hat/cap (2)", None,
     [("t-shirt", (1, 2, 3, 4), False, True), ("mr. smith's hat/cap (2)", (1, 2, 3, 4), False, True)], []),
    ("unrequested label flagged", loc(1, 2, 3, 4) + " dog ; " + loc(1, 2, 3, 4) + " horse", ["Dogs"],
     [("dog", (1, 2, 3, 4), False, True), ("horse", (1, 2, 3, 4), False, False)], []),
    ("plural output, singular request", loc(1, 2, 3, 4) + " boxes", ["box"], [("boxes", (1, 2, 3, 4), False, True)], []),
    ("missing label uses the one requested", loc(1, 2, 3, 4), ["car"], [("car", (1, 2, 3, 4), False, True)], []),
    ("missing label, two requested", loc(1, 2, 3, 4) + " ; " + loc(5, 6, 7, 8) + " b", ["a", "b"],
     [("", (1, 2, 3, 4), False, False), ("b", (5, 6, 7, 8), False, True)], []),
    ("segmentation", loc(10, 20, 30, 40) + SEGS + " cat", ["cat"], [("cat", (10, 20, 30, 40), True, True)], []),
    ("segmentation without label (RefCOCO)", loc(10, 20, 30, 40) + SEGS, None, [("", (10, 20, 30, 40), True, True)], []),
    ("segmentation with space", loc(10, 20, 30, 40) + " " + SEGS + " cat", None, [("cat", (10, 20, 30, 40), True, True)], []),
    ("text before first loc", "here you go: " + loc(1, 2, 3, 4) + " cat", None, [("cat", (1, 2, 3, 4), False, True)], []),
    ("cut mid-loc", loc(1, 2, 3, 4) + " cat ; " + loc(5, 6, 7), None, [("cat", (1, 2, 3, 4), False, True)],
     ["only 3 of 4 <loc>"]),
    ("cut inside a loc token", loc(1, 2, 3, 4) + " cat ; " + loc(5, 6) + "<loc00", None,
     [("cat", (1, 2, 3, 4), False, True)], ["malformed token", "only 2 of 4"]),
    ("cut mid-seg", loc(1, 2, 3, 4) + SEGS[: 9 * 8], ["cat"], [("cat", (1, 2, 3, 4), False, True)], ["only 9 of 16 <seg>"]),
    ("cut mid-label", loc(1, 2, 3, 4) + " ca", ["cat"], [("ca", (1, 2, 3, 4), False, False)], []),
    ("too many segs", loc(1, 2, 3, 4) + SEGS + "<seg001> x", None, [("x", (1, 2, 3, 4), True, True)], ["beyond 16"]),
    ("stray seg", "<seg001> " + loc(1, 2, 3, 4) + " cat <seg002>", None, [("cat", (1, 2, 3, 4), False, True)],
     ["2 <seg> token(s) outside"]),
    ("junk tokens", "<unk>" + loc(1, 2, 3, 4) + "<pad> cat<eos>", None, [("cat", (1, 2, 3, 4), False, True)],
     ["<unk>, <pad>, <eos>"]),
    ("stray angle brackets", loc(1, 2, 3, 4) + " big > cat <", None, [("big cat", (1, 2, 3, 4), False, True)], []),
    ("out-of-range loc", loc(1, 2, 3, 1500) + " cat", None, [], ["out of range", "only 3 of 4"]),
    ("out-of-range seg", loc(1, 2, 3, 4) + "<seg200> cat", None, [("cat", (1, 2, 3, 4), False, True)], ["out of range"]),
    ("degenerate box dropped", loc(300, 10, 200, 20) + " cat ; " + loc(1, 5, 3, 5) + " dog", None, [],
     ["degenerate", "degenerate"]),
    ("text interrupts locs", loc(1, 2) + " cat " + loc(1, 2, 3, 4) + " dog", None, [("dog", (1, 2, 3, 4), False, True)],
     ["only 2 of 4"]),
    ("orphan label after ;", loc(1, 2, 3, 4) + " cat ; dog", None, [("cat", (1, 2, 3, 4), False, True)], ["has no <loc>"]),
    ("empty", "", ["cat"], [], []),
    ("plain text", "a dog and a cat on a sofa", None, [], []),
    ("only separators", " ; ; ;", None, [], []),
]


@pytest.mark.parametrize("text, requested, expected, errors", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_table(text, requested, expected, errors):
    r = parse_detections(text, (W, H), requested_labels=requested)
    got = [(d.label, d.loc, d.seg_tokens is not None, d.requested) for d in r.detections]
    assert got == expected
    assert len(r.errors) == len(errors), r.errors
    for want, have in zip(errors, r.errors):
        assert want in have, r.errors
    for d in r.detections:
        y0, x0, y1, x1 = d.loc
        assert d.box == pytest.approx((x0 / 1024 * W, y0 / 1024 * H, x1 / 1024 * W, y1 / 1024 * H))
        assert d.score is None and d.mask is None
        if d.seg_tokens is not None:
            assert len(d.seg_tokens) == 16 and all(0 <= v < 128 for v in d.seg_tokens)


def test_seg_values_and_text_without_tokens():
    r = parse_detections("found " + loc(10, 20, 30, 40) + SEGS + " cat ; " + loc(1, 2, 3, 4) + " dog", (W, H))
    assert r.detections[0].seg_tokens == tuple(range(16))
    assert r.text == "found cat ; dog"
    assert parse_detections("  a cat  ", (W, H)).text == "a cat"


@pytest.mark.parametrize("denominator, expected", [
    (1024, (512 / 1024 * 300, 256 / 1024 * 200, 1023 / 1024 * 300, 1023 / 1024 * 200)),
    (1023, (512 / 1023 * 300, 256 / 1023 * 200, 300.0, 200.0)),
])
def test_1023_vs_1024_convention_on_non_square_image(denominator, expected):
    r = parse_detections(loc(256, 512, 1023, 1023) + " cat", (300, 200), coord_denominator=denominator)
    assert r.detections[0].box == pytest.approx(expected)
    assert r.detections[0].box[2] <= 300 and r.detections[0].box[3] <= 200


def test_bad_arguments_raise_but_bad_text_does_not():
    with pytest.raises(ValueError, match="coord_denominator"):
        parse_detections("", (10, 10), coord_denominator=1000)
    with pytest.raises(ValueError, match="image_size"):
        parse_detections("", (0, 10))
    assert parse_detections(None, (10, 10)).errors  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=["built", "demo"])
def tokenizer(request, tmp_path_factory):
    from palikit.testing import CHARS, WORDS
    from palikit.tokenizer import Tokenizer, build_tokenizer

    if request.param == "demo":  # the bundled demo model's tokenizer (Gemma-style, loc/seg atomic)
        from palikit.assets import bundled_demo_model

        return Tokenizer.from_file(bundled_demo_model())
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(WORDS + CHARS, folder / "tokenizer.json")
    return Tokenizer.from_file(folder)


def _as_tuple(r):
    return ([(d.label, d.box, d.loc, d.score, d.seg_tokens, d.requested, d.mask_score) for d in r.detections],
            r.errors, r.text)


@pytest.mark.parametrize("denom", [1024, 1023])
@pytest.mark.parametrize("text, requested, expected, errors", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_id_path_equals_text_path_on_the_table(tokenizer, text, requested, expected, errors, denom):
    """Detections built from token ids + log-probs (what PaliGemma._result uses) equal the text parser's
    on the decoded text with per-token texts: labels, boxes, locs, scores, masks, requested flags,
    errors and text, for every case of the table."""
    import random

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # characters the small test vocabulary lacks become <unk>
        ids = tokenizer.encode(text)
    rng = random.Random(len(ids))
    lps = [-rng.random() * 3 for _ in ids]
    size = (W, H)
    by_text = parse_detections(tokenizer.decode(ids), size, requested_labels=requested, coord_denominator=denom,
                               token_texts=tokenizer.token_texts(ids), token_logprobs=lps)
    by_ids = detections_from_ids(ids, lps, tokenizer, size, requested_labels=requested, coord_denominator=denom)
    assert _as_tuple(by_ids) == _as_tuple(by_text)
    if expected:  # the ids path read something real, with scores from the log-probs
        assert by_ids.detections and all(d.score is not None for d in by_ids.detections)
    if tokenizer.decode(ids) == text:  # the tokenizer round-trips the case: the table's own expectations hold
        assert [(d.label, d.loc) for d in by_ids.detections] == [(e[0], e[1]) for e in expected]


_ATOMS = st.one_of(
    st.integers(0, 1100).map(lambda v: f"<loc{v:04d}>"), st.integers(0, 140).map(lambda v: f"<seg{v:03d}>"),
    st.sampled_from([" ; ", ";", " ", "<", ">", "<loc", "<seg12", "<loc12>", "\n", "<eos>"]),
    st.text(alphabet="abcxyz -.'<>;", max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_ATOMS, max_size=40), size=st.tuples(st.integers(1, 2000), st.integers(1, 2000)),
       denom=st.sampled_from([1023, 1024]), requested=st.one_of(st.none(), st.lists(st.text(max_size=5), max_size=3)))
def test_fuzz_never_raises_and_boxes_stay_inside(pieces, size, denom, requested):
    text = "".join(pieces)
    r = parse_detections(text, size, requested_labels=requested, coord_denominator=denom)
    w, h = size
    for d in r.detections:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert all(0 <= v <= 1023 for v in d.loc)
        assert not set(d.label) & set("<>;") and d.label == d.label.strip()
        assert d.seg_tokens is None or len(d.seg_tokens) == 16
    assert isinstance(r.text, str) and all(isinstance(e, str) for e in r.errors)


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_fuzz_arbitrary_unicode(text):
    parse_detections(text, (64, 48), token_texts=[text], token_logprobs=[-1.0])


def test_confidence_from_token_logprobs():
    # tokens as a Gemma-style tokenizer would split them: one piece per special token, words with spaces
    token_texts = ["<loc0100>", "<loc0200>", "<loc0300>", "<loc0400>", " hot", " dog", " ;", " ",
                   "<loc0001>", "<loc0002>", "<loc0003>", "<loc0004>"] + [f"<seg{i:03d}>" for i in range(16)] + [" cat"]
    lps = [-0.1, -0.2, -0.3, -0.4, -1.0, -2.0, -9.0, -9.0] + [-0.5] * 4 + [-0.05 * (i + 1) for i in range(16)] + [-0.7]
    text = "".join(token_texts)
    r = parse_detections(text, (W, H), token_texts=token_texts, token_logprobs=lps)
    assert [d.label for d in r.detections] == ["hot dog", "cat"]
    hot, cat = r.detections
    assert hot.score == pytest.approx(math.exp((-0.1 - 0.2 - 0.3 - 0.4 - 1.0 - 2.0) / 6))  # separator not counted
    assert hot.mask_score is None
    assert cat.score == pytest.approx(math.exp((-0.5 * 4 - 0.7) / 5))
    assert cat.mask_score == pytest.approx(math.exp(sum(-0.05 * (i + 1) for i in range(16)) / 16))
    assert 0 < cat.mask_score < 1 and r.errors == []


def test_confidence_with_merged_label_token_and_bad_token_texts():
    token_texts = ["<loc0100>", "<loc0200>", "<loc0300>", "<loc0400>", " do", "g ;", " x"]
    lps = [-0.1, -0.1, -0.1, -0.1, -0.5, -1.5, -3.0]
    r = parse_detections("".join(token_texts), (W, H), token_texts=token_texts, token_logprobs=lps)
    assert r.detections[0].label == "dog"
    assert r.detections[0].score == pytest.approx(math.exp((-0.4 - 0.5 - 1.5) / 6))  # "g ;" overlaps the label
    bad = parse_detections(loc(1, 2, 3, 4) + " dog", (W, H), token_texts=["nope"], token_logprobs=[-1.0])
    assert bad.detections[0].score is None and "do not join" in bad.errors[0]
    short = parse_detections(loc(1, 2, 3, 4) + " dog", (W, H), token_texts=[loc(1, 2, 3, 4), " dog"], token_logprobs=[-1.0])
    assert short.detections[0].score is None and "token_logprobs" in short.errors[0]


def _det(label: str, box, score=None) -> Detection:
    return Detection(label=label, box=box, loc=(0, 0, 1, 1), score=score)


def test_dedupe_keeps_best_of_same_label_only():
    dets = [_det("dog", (0, 0, 10, 10), 0.5), _det("dog", (0, 0, 10, 11), 0.9), _det("cat", (0, 0, 10, 10), 0.1),
            _det("Dog", (50, 50, 60, 60), 0.2), _det("dog", (1, 0, 10, 10), 0.3)]
    kept = dedupe(dets, 0.7)
    assert kept == [dets[1], dets[2], dets[3]]
    no_scores = [_det("dog", (0, 0, 10, 10)), _det("dog", (0, 0, 10, 10.5)), _det("dog", (0, 0, 4, 10))]
    assert dedupe(no_scores) == [no_scores[0], no_scores[2]]
    assert dedupe(no_scores, iou_threshold=0.99) == no_scores


@pytest.mark.parametrize("requested, label", [([";"], ""), (["<cat>"], ""), (["cat\n"], ""), ([";", "cat"], "cat"),
                                              (["cat"], "cat")])
def test_a_requested_label_no_prompt_could_hold_is_not_filled_in(requested, label):
    # found by the fuzz test: one requested "label" ';' was given to an unlabelled box
    r = parse_detections("<loc0000><loc0000><loc0001><loc0001>", (1, 1), requested_labels=requested)
    assert [d.label for d in r.detections] == [label]
