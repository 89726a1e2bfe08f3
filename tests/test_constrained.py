"""Constrained detect / segment output (tasks/constrain.py on the engine's per-row constraints).

- The grammar alone (no model), fuzzed: every valid output (any label form, any separator, the
  tokenizer's own pieces or letter by letter) is accepted token by token; random walks through the
  allowed tokens always parse without an error, with requested labels only, within the budget.
- A tiny random checkpoint, fuzzed over label sets, sampling and budgets: constrained output never
  holds an unrequested label or a malformed object; labels come back in the requested spelling.
- The bundled demo model: where the raw greedy output is valid with the requested labels, the
  constrained output is the same tokens (singular and plural prompts, detect and segment).
- Batch mates: constrained rows beside raw and caption rows leave theirs identical to alone.
- Bad input: no labels, unwritable labels, constrained=true on a caption, beams.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from palikit.api import PaliGemma
from palikit.tasks.constrain import DetectGrammar, fold_labels, grammar_for_prompt, label_spellings
from palikit.tasks.labels import normalize_label
from palikit.tasks.parse import parse_detections
from palikit.tokenizer import build_tokenizer

POOL = ["cat", "dog", "red car", "Circle", "squares", "the dog", "box", "T-shirt", "glass", "x"]
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))


@pytest.fixture(scope="module")
def tok(pg):
    return pg.tokenizer


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


def _walk(grammar, ids):
    """Feed `ids` through a fresh cursor; the index of the first token it does not allow (None: all)."""
    cursor = grammar.start()
    for n, i in enumerate(ids):
        if i not in set(cursor.allowed().tolist()):
            return n
        cursor.advance(i)
    return None


def _letters(tok, text):
    """`text` one character piece at a time (loc/seg tokens whole)."""
    out = []
    for part in text.replace(">", ">\0").replace("<", "\0<").split("\0"):
        if part.startswith("<"):
            out += tok.encode(part)
        else:
            out += [tok.token_to_id(c.replace(" ", "\u2581")) for c in part]
    return out


@st.composite
def outputs(draw, segment: bool):
    labels = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        y0, x0 = draw(st.integers(0, 1022)), draw(st.integers(0, 1022))
        y1, x1 = draw(st.integers(y0 + 1, 1023)), draw(st.integers(x0 + 1, 1023))
        form = draw(st.sampled_from(label_spellings(draw(st.sampled_from(labels)))))
        segs = "".join(f"<seg{draw(st.integers(0, 127)):03d}>" for _ in range(16)) if segment else ""
        parts.append(f"<loc{y0:04d}><loc{x0:04d}><loc{y1:04d}><loc{x1:04d}>{segs} {form}")
    sep = draw(st.sampled_from([" ; ", " ;", ";", "; "]))
    return labels, sep.join(parts)


@pytest.mark.parametrize("segment", [False, True])
def test_every_valid_output_is_accepted(tok, segment):
    @settings(max_examples=60, deadline=None)
    @given(outputs(segment))
    def check(case):
        labels, text = case
        grammar = DetectGrammar(tok, labels, segment)
        for ids in (tok.encode(text), _letters(tok, text)):
            assert _walk(grammar, ids + [tok.eos_id]) is None, (text, ids)

    check()


def test_wrong_outputs_are_refused(tok):
    g = DetectGrammar(tok, ["cat", "dog"], segment=False)
    enc = tok.encode
    assert _walk(g, enc("<loc0010><loc0020><loc0030><loc0040> horse")) == 4 + 1  # " h" is no label's start
    assert _walk(g, enc("<loc0010><loc0020><loc0005><loc0040> cat")) == 2  # y1 <= y0
    assert _walk(g, enc("<loc0010><loc0020><loc0030> cat")) == 3  # a fourth loc is needed
    assert _walk(g, enc("<loc0010><loc0020><loc0030><loc0040><seg001> cat")) == 4  # no segs in detect
    assert _walk(g, enc("<loc0010><loc0020><loc0030><loc0040> cat") + [tok.eos_id]) is None
    assert _walk(g, enc("<loc0010><loc0020><loc0030><loc0040>") + [tok.eos_id]) == 4  # a label first
    s = DetectGrammar(tok, ["cat"], segment=True)
    assert _walk(s, enc("<loc0010><loc0020><loc0030><loc0040> cat")) == 4  # 16 segs first


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True), seed=st.integers(0, 10**6),
       segment=st.booleans(), budget=st.integers(1, 120))
def test_random_walks_parse_clean_within_budget(tok, labels, seed, segment, budget):
    grammar = DetectGrammar(tok, labels, segment)
    cursor, rng, ids = grammar.start(budget), random.Random(seed), []
    while len(ids) < budget:
        nxt = rng.choice(cursor.allowed().tolist())
        if nxt == tok.eos_id:
            break
        cursor.advance(nxt)
        ids.append(nxt)
    _assert_clean(tok.decode(ids), labels, segment)


def _assert_clean(text, labels, segment):
    parsed = parse_detections(text, (100, 100), requested_labels=labels)
    assert parsed.errors == [], text
    wanted = {normalize_label(f) for lbl in labels for f in label_spellings(lbl)}
    for d in parsed.detections:
        assert normalize_label(d.label) in wanted, (d.label, text)
        assert (d.seg_tokens is not None) == segment
    fold_labels(parsed.detections, labels)
    assert all(d.label in labels and d.requested for d in parsed.detections)
    return parsed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(labels=st.lists(st.sampled_from(POOL), min_size=1, max_size=3, unique=True), segment=st.booleans(),
       temperature=st.sampled_from([0.0, 0.7, 1.5]), seed=st.integers(0, 2**31), budget=st.integers(4, 48))
def test_tiny_model_constrained_output_is_always_well_formed(pg, image, labels, segment, temperature, seed, budget):
    task = pg.segment if segment else pg.detect
    result = task(image, labels, temperature=temperature, seed=seed, max_new_tokens=budget)
    assert len(result.tokens) <= budget
    parsed = _assert_clean(result.text, labels, segment)
    assert [d.label for d in result.detections] == [d.label for d in parsed.detections]
    assert not [e for e in result.errors if "mask codec" not in e]


def test_tiny_model_raw_output_is_not_constrained(pg, image):
    """The raw random model writes text outside the grammar: the constraint is what keeps it in."""
    raw = [pg.detect(image, ["cat", "dog"], constrained=False, seed=s, temperature=1.0, max_new_tokens=24)
           for s in range(4)]
    assert any(r.errors or any(not d.requested for d in r.detections) or not r.text.startswith("<loc")
               for r in raw)


def test_constrained_rows_leave_their_batch_mates_unchanged(pg, image):
    prompts = ["detect cat ; dog", "caption en", "detect cat ; dog", "segment red car"]
    opts = [dict(constrained=None), dict(), dict(constrained=False), dict(seed=3, temperature=1.0)]
    alone = [pg.predict(image, p, max_new_tokens=20, **o) for p, o in zip(prompts, opts)]
    pending = [pg.submit(image, p, max_new_tokens=20, **o) for p, o in zip(prompts, opts)]
    together = [p.result() for p in pending]
    for a, t in zip(alone, together):  # (log-probs: batched matmuls round differently)
        assert a.tokens == t.tokens
        np.testing.assert_allclose(a.token_logprobs, t.token_logprobs, atol=1e-4)
    assert together[1].tokens == pg.predict(image, "caption en", max_new_tokens=20, constrained=False).tokens


def test_label_spelling_is_the_requested_one():
    class D:
        def __init__(self, label):
            self.label, self.requested = label, False

    ds = [D("circle"), D("Squares"), D("triangle")]
    fold_labels(ds, ["Circles", "square"])
    assert [d.label for d in ds] == ["Circles", "square", "triangle"]
    assert [d.requested for d in ds] == [True, True, False]
    assert label_spellings("Circles") == ["Circles", "Circle", "circles", "circle"]
    assert label_spellings("box") == ["box", "boxes"] and label_spellings("glass") == ["glass", "glasses"]


def test_bad_input_is_clear(pg, image, tmp_path):
    with pytest.raises(ValueError, match="at least one label"):
        pg.predict(image, "detect")
    with pytest.raises(ValueError, match="at least one label"):
        grammar_for_prompt(pg.tokenizer, "segment  ", None)
    with pytest.raises(ValueError, match="cannot be written"):
        pg.detect(image, ["caf\u00e9"])  # the tiny tokenizer has no 'é' and no byte fallback
    assert pg.detect(image, ["caf\u00e9"], constrained=False, max_new_tokens=4).tokens  # the raw model runs
    with pytest.raises(ValueError, match="needs a detect/segment prompt"):
        pg.predict(image, "caption en", constrained=True)
    with pytest.raises(ValueError, match="constrained must be"):
        pg.detect(image, ["cat"], constrained="boxes")
    with pytest.raises(ValueError, match="num_beams=1"):
        pg.detect(image, ["cat"], constrained=True, num_beams=2, max_new_tokens=6)
    beams = pg.detect(image, ["cat"], num_beams=2, max_new_tokens=6)  # auto: beam search runs raw
    assert beams.tokens == pg.detect(image, ["cat"], num_beams=2, max_new_tokens=6, constrained=False).tokens
    # a byte-fallback tokenizer writes 'é' from its byte pieces: the label works
    bf = build_tokenizer(["cat"] + list("abcdefghijklmnopqrstuvwxyz"), tmp_path / "bf", byte_fallback=True)
    g = DetectGrammar(bf, ["caf\u00e9"])
    text = "<loc0001><loc0002><loc0003><loc0004> caf\u00e9"
    assert _walk(g, bf.encode(text) + [bf.eos_id]) is None
    assert any(bf.id_to_token(i).startswith("<0x") for i in bf.encode(text))


def test_natural_wording_takes_the_grammar_when_asked(pg, image):
    res = pg.predict(image, "find the cats", labels=["cat"], constrained="detect", max_new_tokens=30)
    _assert_clean(res.text, ["cat"], segment=False)
    assert pg.predict(image, "find the cats", labels=["cat"], max_new_tokens=8).tokens == \
        pg.predict(image, "find the cats", labels=["cat"], max_new_tokens=8, constrained=False).tokens  # auto: raw


# ------------------------------------------------------------------------------ the bundled demo model
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from palikit.assets import bundled_demo_model
    from palikit.demo import shapes
    from palikit.demo.splits import write_split

    folder = bundled_demo_model()
    assert folder is not None, "the package ships no demo model"
    demo_pg = PaliGemma.from_pretrained(str(folder), device="cpu", dtype="float32")
    data = write_split(shapes, tmp_path_factory.mktemp("demo-test"), "test", 24, 112, seg_fn=lambda s: [0] * 16)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    return demo_pg, data, rows


@pytest.mark.slow  # 2 x 64 demo-model predictions per task
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_demo_model_valid_raw_outputs_are_unchanged(demo, task):
    pg_demo, data, rows = demo
    rows = [r for r in rows if r["task"] == task][:16]
    images = [str(data / r["image"]) for r in rows]
    checked = 0
    for form in (lambda x: x, lambda x: x + "s"):
        labels = [[form(x) for x in r["prefix"].split(" ", 1)[1].split(" ; ")] for r in rows]
        prompts = [f"{task} " + " ; ".join(ls) for ls in labels]
        raw = pg_demo.predict_batch(images, prompts, labels=labels, constrained=False)
        con = pg_demo.predict_batch(images, prompts, labels=labels)
        for ls, r, c in zip(labels, raw, con):
            _assert_clean(c.text, ls, task == "segment")
            assert all(d.label in ls for d in c.detections)
            if not r.errors and all(d.requested for d in r.detections):
                assert c.tokens == r.tokens  # (log-probs: batch mates differ, so matmul shapes do)
                np.testing.assert_allclose(c.token_logprobs, r.token_logprobs, atol=1e-4)
                checked += 1
    assert checked >= len(rows)  # most raw outputs are valid: the comparison is not vacuous


@pytest.mark.slow  # 2 x 3 x 8 demo-model predictions
@pytest.mark.parametrize("task", ["detect", "segment"])
def test_demo_model_raw_outputs_that_end_at_the_budget_are_unchanged(demo, task):
    """A budget that ends right after a label (the raw model stops there by length) keeps that object;
    one token less holds no whole object, so the constrained output is empty where the raw one is cut."""
    pg_demo, data, rows = demo
    rows = [r for r in rows if r["task"] == task][:8]
    checked = 0
    for r in rows:
        image, labels = str(data / r["image"]), r["prefix"].split(" ", 1)[1].split(" ; ")
        prompt = f"{task} " + " ; ".join(labels)
        raw = pg_demo.predict(image, prompt, labels=labels, constrained=False)
        if raw.errors or not raw.detections or not all(d.requested for d in raw.detections):
            continue
        n = len(raw.tokens)
        at = pg_demo.predict(image, prompt, labels=labels, max_new_tokens=n)
        assert at.tokens == raw.tokens, (prompt, raw.text, at.text)
        cut = pg_demo.predict(image, prompt, labels=labels, max_new_tokens=n - 1)
        _assert_clean(cut.text, labels, task == "segment")
        assert len(cut.detections) == len(raw.detections) - 1  # the last object no longer fits: never half of it
        checked += 1
    assert checked >= 4


def test_an_object_that_fits_the_budget_exactly_may_start(tok):
    for segment in (False, True):
        g = DetectGrammar(tok, ["triangle", "circles"], segment)
        fewest = g.fewest(g.root)
        assert 1 <= fewest <= len(" circle")  # the fewest pieces of any form (" circle" for "circles")
        exact = 4 + (16 if segment else 0) + fewest
        assert g.object_tokens == exact
        assert g.start(exact).allowed().numel() == 1024  # 1023 <loc> and EOS
        assert g.start(exact - 1).allowed().tolist() == [tok.eos_id]


def test_http_constrained_field(pg, image):
    """/v1/detect, /v1/segment and /v1/predict: constrained by default, `constrained: false` the raw
    model (JSON and multipart), a bad value or no labels a 400 naming the problem."""
    import asyncio
    import base64

    import httpx

    from palikit.serve import ServerSettings, create_app

    b64 = base64.b64encode(image.read_bytes()).decode()
    common = {"image": b64, "max_new_tokens": 24, "temperature": 1.0, "seed": 5}

    async def main():
        app = create_app(pg, ServerSettings(warmup=False))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                out = [await client.post(path, json={**common, **body}) for path, body in (
                    ("/v1/detect", {"labels": "cat ; dog"}),
                    ("/v1/detect", {"labels": "cat ; dog", "constrained": False}),
                    ("/v1/segment", {"labels": ["red car"]}),
                    ("/v1/predict", {"prompt": "detect cat"}),
                    ("/v1/predict", {"prompt": "find a cat", "labels": "cat", "constrained": "detect"}),
                    ("/v1/detect", {"labels": "cat", "constrained": "boxes"}),
                    ("/v1/predict", {"prompt": "detect"}))]
                form = {k: str(v) for k, v in common.items() if k != "image"}
                out.append(await client.post("/v1/detect", data={**form, "labels": "cat", "constrained": "false"},
                                             files={"image": ("i.png", image.read_bytes(), "image/png")}))
                return out

    con, raw, seg, pred, natural, bad, empty, form_raw = asyncio.run(main())
    for r in (con, raw, seg, pred, natural, form_raw):
        assert r.status_code == 200, r.text
    _assert_clean(con.json()["text"], ["cat", "dog"], False)
    _assert_clean(seg.json()["text"], ["red car"], True)
    _assert_clean(pred.json()["text"], ["cat"], False)
    _assert_clean(natural.json()["text"], ["cat"], False)
    assert raw.json()["tokens"] == pg.detect(image, "cat ; dog", constrained=False, max_new_tokens=24,
                                             temperature=1.0, seed=5).tokens
    assert raw.json()["tokens"] != con.json()["tokens"]
    assert form_raw.json()["tokens"] == pg.detect(image, "cat", constrained=False, max_new_tokens=24,
                                                  temperature=1.0, seed=5).tokens
    assert bad.status_code == 400 and "constrained" in bad.text
    assert empty.status_code == 400 and "at least one label" in empty.text


def test_sensitivity_gains_a_constrained_column(demo, tmp_path):
    """`palikit eval --sensitivity` on detect: every variant runs raw (the score) and constrained to
    the task's grammar whatever its wording (the column); constrained predictions hold requested labels only."""
    from palikit.eval import evaluate_prompt_variants
    from palikit.eval.datasets import load_coco

    pg_demo, data, _ = demo
    asked = {x.id: x.labels for x in load_coco(data / "test_coco.json", "detect", image_root=data).samples}
    sens = evaluate_prompt_variants(pg_demo, data / "test_coco.json", "detect", out_dir=tmp_path / "s", limit=6,
                                    variants={"natural": "find the {labels_natural}"}, case=False, separators=False,
                                    charts=False, progress=False, image_root=data)
    assert set(sens.columns["constrained"]) == set(sens.scores) == {"default", "natural"}
    assert "constrained" in sens.to_dict()["column_spreads"] and "spread of the constrained column" in sens.markdown()
    for name in sens.scores:
        rows = [json.loads(x) for x in (tmp_path / "s" / f"{name}-constrained" / "predictions.jsonl").read_text()
                .splitlines() if x.strip()]
        assert len(rows) == 6
        for row in rows:
            _assert_clean(row["text"], asked[row["id"]], False)


def test_cli_eval_raw_and_constrained_flags(demo, tmp_path, monkeypatch):
    import palikit.cli.predict
    from palikit.cli import main

    pg_demo, data, _ = demo
    seen = []

    class Recorder:
        name = "recorder"

        def predict_batch(self, images, prompts, labels=None, **opts):
            seen.append(opts.get("constrained", "auto"))
            return pg_demo.predict_batch(images, prompts, labels=labels, **opts)

    monkeypatch.setattr(palikit.cli.predict, "load_model", lambda *a, **k: Recorder())
    for flag, want in (([], "auto"), (["--raw"], False), (["--constrained"], True)):
        seen.clear()
        args = ["eval", str(data / "test_coco.json"), "--task", "detect", "--limit", "2", "--no-progress",
                "--out", str(tmp_path / str(want))]
        assert main(args + flag) == 0
        assert seen and set(seen) == {want}
