"""Streaming is one more consumer of the continuous-batching loop: streamed text equals the
non-streamed text (also while other requests decode beside it), detokenization is incremental
(a bounded number of window decodes per token, whatever the length), and submit() stamps are ordered."""

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
