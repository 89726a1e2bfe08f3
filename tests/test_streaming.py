"""Streaming is one more consumer of the continuous-batching loop: streamed text equals the
non-streamed text (also while other requests decode beside it), detokenization is incremental
(a bounded number of window decodes per token, whatever the length), a streamed request's Result is
built from the stream's own per-token texts (the ids are not decoded a second time) and equals the
plain Result, and submit() stamps are ordered."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from palikit.api import PaliGemma
from palikit.testing import make_tiny_checkpoint
from palikit.tokenizer import TextStream


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    return PaliGemma.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), family="pg1"), device="cpu")


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8))


def test_streams_batched_with_other_requests_equal_their_plain_answers(pg):
    jobs = [(_image(i), ["caption en", "describe en", "ocr"][i % 3], 6 + 5 * i) for i in range(6)]
    expected = [pg.predict(img, p, max_new_tokens=m).text for img, p, m in jobs]
    streamed = [None] * len(jobs)

    def stream(i):
        img, p, m = jobs[i]
        streamed[i] = "".join(pg.stream(img, p, max_new_tokens=m))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(0, 6, 2)]
    for t in threads:
        t.start()
    plain = [pg.submit(jobs[i][0], jobs[i][1], max_new_tokens=jobs[i][2]) for i in range(1, 6, 2)]
    for t in threads:
        t.join(60)
    for i, p in zip(range(1, 6, 2), plain):
        streamed[i] = p.result().text
    assert streamed == expected


def test_detokenization_is_incremental(pg, monkeypatch):
    tok = pg.tokenizer
    ids = tok.encode("a circle and a square and some words " * 40)
    calls = []
    real = tok._decode_many
    monkeypatch.setattr(tok, "_decode_many", lambda seqs, skip: calls.append(sum(map(len, seqs))) or real(seqs, skip))
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    n_calls = len(calls)
    assert "".join(pieces) == tok.decode(ids)
    assert n_calls <= 2 * len(ids) + 2
    assert max(calls[:n_calls]) <= 16  # each decode is a small window, not the whole text so far


def test_submit_stamps_are_ordered(pg):
    pending = pg.submit(_image(9), "caption en", max_new_tokens=8)
    result = pending.result(timeout=60)
    assert pending.t_submit <= pending.t_first_token <= pending.t_done
    assert result.tokens == pending.ticket.tokens


def test_a_streamed_result_reuses_the_streams_texts_and_equals_the_plain_result(pg, monkeypatch):
    plain = pg.predict(_image(3), "caption en", max_new_tokens=12)
    calls = []
    for name in ("decode", "token_texts"):
        real = getattr(pg.tokenizer, name)
        monkeypatch.setattr(pg.tokenizer, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    pieces = []
    streamed = pg.submit(_image(3), "caption en", max_new_tokens=12, on_text=pieces.append).result(timeout=60)
    assert calls == []  # the stream turned each id into text once; the Result reused those texts
    assert "".join(pieces) == streamed.text
    assert (streamed.text, streamed.tokens, streamed.detections, streamed.errors) == \
        (plain.text, plain.tokens, plain.detections, plain.errors)
    assert streamed.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-5)
