"""Closed-set answers (`choices=`): every choice's log P(choice tokens + EOS | image, prompt) from the
engine's one-prefill batched pass equals a teacher-forced forward in transformers (eager, fp32) over
[image][BOS] prompt "\\n" choice [EOS] with the prefix-LM mask, on tiny PaliGemma 1 / 2 checkpoints and
the bundled demo model; probabilities are the softmax over the set; bad choice sets are refused by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from palikit.api import PaliGemma
from palikit.assets import bundled_demo_model
from palikit.engine.score import score_continuations
from palikit.testing import hf_model_from, make_tiny_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for family in ("pg1", "pg2"):
        folder = make_tiny_checkpoint(tmp_path_factory.mktemp(family) / "ckpt", family=family, seed=3)
        out[family] = PaliGemma.from_pretrained(folder, device="cpu", dtype="float32")
    return out


@pytest.fixture(scope="module")
def demo():
    return PaliGemma.from_pretrained(bundled_demo_model(), device="cpu", dtype="float32")


def _image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def transformers_logprobs(pg: PaliGemma, hf, image, prompt: str, choice: str) -> float:
    """log P(choice + EOS | image, prompt): one teacher-forced forward of the full training row."""
    cfg = pg.model.config
    tokens = pg.tokenizer.encode_prompt(prompt, choice)
    pixel_values = pg.processor.preprocess_with_sizes([image])[0]  # [1, 3, S, S]
    n_img = cfg.vision.num_image_tokens
    ids = torch.tensor([[cfg.image_token_index] * n_img + tokens.ids])
    token_type = torch.tensor([[0] * n_img + tokens.ar_mask])  # 1 on the suffix (choice + EOS): causal
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids),
                    token_type_ids=token_type, position_ids=torch.arange(1, ids.shape[1] + 1)[None]).logits[0]
    logprobs = torch.log_softmax(logits[:, : cfg.output_vocab_size].double(), dim=-1)
    start = n_img + tokens.prefix_len  # first suffix token; predicted at the position before it
    return sum(float(logprobs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))


def check_against_transformers(pg: PaliGemma, image, prompt: str, choices: list[str]) -> None:
    hf = hf_model_from(pg.model)
    result = pg.choose(image, prompt, choices)
    got = [c.logprob for c in result.choices]
    expected = [transformers_logprobs(pg, hf, image, prompt, c) for c in choices]
    assert [c.text for c in result.choices] == choices
    assert np.abs(np.array(got) - np.array(expected)).max() < ATOL, (got, expected)
    probs = [c.probability for c in result.choices]
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)
    soft = torch.softmax(torch.tensor(expected, dtype=torch.float64), 0).tolist()
    assert probs == pytest.approx(soft, abs=1e-4)
    assert result.text == choices[int(np.argmax(expected))]


@pytest.mark.parametrize("family", ["pg1", "pg2"])
def test_choice_logprobs_equal_transformers_teacher_forcing(tiny, family, one_thread):
    pg = tiny[family]
    # different lengths (1..several tokens), a choice that is a prefix of another
    choices = ["red", "red circle", "a blue square on the dog", "7", "what"]
    check_against_transformers(pg, _image(1), "answer en what is this", choices)
    check_against_transformers(pg, _image(2, (25, 60)), "caption en", ["cat", "the cat"])


def test_demo_model_choice_logprobs_equal_transformers(demo, one_thread):
    check_against_transformers(demo, _image(4), "answer en what color is the circle?",
                               ["red", "green", "blue", "yellow"])


def test_groups_under_a_memory_bound_give_the_same_logprobs(tiny, one_thread):
    """A tiny `max_bytes` puts every continuation in a group of its own: same numbers as one group."""
    pg = tiny["pg2"]
    request = _request(pg, "answer en how many")
    conts = [pg.tokenizer.encode_prompt("", "a b c").ids[2:], [5, 1], [7, 8, 9, 1], [1]]
    one = score_continuations(pg.model, request, conts)
    each = score_continuations(pg.model, request, conts, max_bytes=1)
    assert [len(x) for x in one] == [len(c) for c in conts]
    for a, b in zip(one, each):
        assert a == pytest.approx(b, abs=1e-5)


def _request(pg, prompt):
    from palikit.engine import Request

    pv = pg.processor.preprocess_with_sizes([_image(7)])[0]
    feats = pg.model.embed_images(pv[None])[0].detach()
    return Request(pg.encode_prompt(prompt), feats)


def test_answer_classify_and_predict_with_choices(tiny, one_thread):
    pg = tiny["pg1"]
    im = _image(5)
    a = pg.answer(im, "what is this", choices=["cat", "dog", "red"])
    b = pg.choose(im, "answer en what is this", ["cat", "dog", "red"])
    c = pg.predict(im, "answer en what is this", choices=["cat", "dog", "red"])
    assert [x.logprob for x in a.choices] == pytest.approx([x.logprob for x in b.choices], abs=1e-6)
    assert [x.logprob for x in c.choices] == pytest.approx([x.logprob for x in b.choices], abs=1e-6)
    k = pg.classify(im, "cat ; dog ; red")  # the label rule
    assert [x.text for x in k.choices] == ["cat", "dog", "red"]
    assert k.text == max(k.choices, key=lambda x: x.probability).text
    d = a.to_dict()
    assert set(d["choices"][0]) == {"text", "logprob", "probability"}
    assert d["text"] == a.text and d["tokens"] == a.tokens
    assert pg.tokenizer.decode(a.tokens) == a.text
    again = type(a).from_dict(d)
    assert [x.to_dict() for x in again.choices] == d["choices"]
    t = pg.task("answer", im, "what is this", choices=["cat", "dog", "red"])  # the one routing answer() uses
    assert [x.logprob for x in t.choices] == pytest.approx([x.logprob for x in b.choices], abs=1e-6)
    with pytest.raises(ValueError, match="task caption takes no choices"):
        pg.task("caption", im, choices=["a cat", "a dog"])


def test_the_demo_model_picks_the_right_colour(demo, one_thread):
    """On the demo's own shapes the trained model answers its colour question right, as a closed set."""
    from palikit.demo.shapes import make_sample

    colours = ["red", "green", "blue", "yellow"]
    asked = right = 0
    for i in range(40):
        sample = make_sample(i, seed=11)
        classes = [s.cls for s in sample.shapes]
        shape = next((s for s in sample.shapes if classes.count(s.cls) == 1), None)
        if shape is None:
            continue
        res = demo.answer(sample.image, f"what color is the {shape.cls}", choices=colours)
        asked += 1
        right += res.text == shape.color
        assert res.choices[colours.index(res.text)].probability == max(c.probability for c in res.choices)
        if asked == 8:
            break
    assert asked == 8 and right >= 7, f"{right} of {asked} right"


@pytest.mark.parametrize("choices, message", [
    ([], "choices is empty"),
    ([f"c{i}" for i in range(65)], "65 choices; at most 64"),
    (["yes", "no", "yes"], "'yes' is given twice"),
    (["yes", "  "], "choice 1 is empty"),
    ("yes", "list of strings"),
    (["yes", 3], "choice 1 is a int"),
])
def test_bad_choice_sets_are_refused_by_name(tiny, choices, message):
    with pytest.raises(ValueError, match=message):
        tiny["pg1"].choose(_image(0), "answer en what", choices)


def test_a_choice_that_tokenizes_to_nothing_or_alike_is_refused(tiny):
    from palikit.tasks.choices import prepare_choices

    tok = tiny["pg1"].tokenizer
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        prepare_choices(_EmptyTokenizer(tok), ["yes"])
    with pytest.raises(ValueError, match="tokenize alike"):
        prepare_choices(_SameTokenizer(tok), ["yes", "no"])


class _EmptyTokenizer:
    """A tokenizer that writes no token for any text (as a real one does for characters it drops)."""

    def __init__(self, tok):
        self.tok = tok

    def encode_prompt(self, prefix, suffix):
        out = self.tok.encode_prompt(prefix, "")
        return out


class _SameTokenizer(_EmptyTokenizer):
    def encode_prompt(self, prefix, suffix):
        return self.tok.encode_prompt(prefix, "cat")


def test_a_cancelled_scoring_request_never_runs(tiny, monkeypatch):
    """A closed-set request cancelled while it waits (its HTTP request timed out) is skipped by the engine."""
    import threading

    import palikit.engine.score as score

    pg = tiny["pg1"]
    ran = []
    monkeypatch.setattr(score, "score_continuations", lambda *a, **k: ran.append(1) or [[0.0], [0.0]])
    gate = threading.Event()
    blocker = pg.engine.scheduler.call(gate.wait)  # holds the engine thread
    pending = pg.submit_choices(_image(0), "answer en what", ["a", "b"])
    pending.cancel()
    gate.set()
    blocker.result(10)
    pg.engine.scheduler.call(lambda: None).result(10)  # a later call ran: the queue went past the cancelled one
    assert pending.future.cancelled() and not ran
