"""Overload against a real `palikit serve` process: the engine scheduler's bound is the one admission
path, and every route answers its refusal the same way, 503 + Retry-After, the streaming chat too
(issue 38, S3: a refused streaming chat used to get a 503 without Retry-After). The old flag name
--max-batch-size still sets the slots and --decode-budget-mpx the decode budget (as 8-bit RGB bytes),
each with one deprecation line. Retry-After follows the work ahead (two long requests ahead: 22 s here;
two short ones after them: 2 s), not a mean over past requests."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from serve_helpers import b64, data_url, metric_samples, png_bytes, server_fixture

pytestmark = pytest.mark.slow

LONG = 2000  # tokens: the tiny random model never says EOS, so a request holds its slot for seconds


server = server_fixture("--max-batch-size", "1", "--decode-budget-mpx", "50", "--max-queue", "1", "--max-new-tokens-limit", str(LONG))


def _chat(stream: bool) -> dict:
    return {"model": "tiny", "stream": stream, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                      {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]}


def _engine_full(server) -> bool:
    with server.client() as c:
        text = c.get("/metrics").text
    live = metric_samples(text, "palikit_live_slots")
    queued = metric_samples(text, "palikit_engine_queued")
    return live.get("palikit_live_slots") == 1 and queued.get("palikit_engine_queued") == 1


@contextmanager
def _engine_filled(server, max_new_tokens: int):
    """The one slot decoding and the one queue place taken by captions of `max_new_tokens`; yields the
    list their statuses land in once they end (after the block)."""
    done: list[int] = []

    def occupy():
        with server.client(timeout=120) as c:
            done.append(c.post("/v1/caption", json={"image": b64(png_bytes()),
                                                    "max_new_tokens": max_new_tokens}).status_code)

    busy = [threading.Thread(target=occupy) for _ in range(2)]  # one decodes, one waits for the slot
    for t in busy:
        t.start()
        time.sleep(0.05)
    try:
        deadline = time.monotonic() + 30
        while not _engine_full(server):
            assert time.monotonic() < deadline, "the two requests never filled the slot and the queue"
            time.sleep(0.01)
        yield done
    finally:
        for t in busy:
            t.join(120)


def test_every_route_refuses_a_full_engine_with_503_and_retry_after(server):
    with _engine_filled(server, LONG) as done, server.client() as c:
        refused = {"stream": c.post("/v1/chat/completions", json=_chat(True)),
                   "chat": c.post("/v1/chat/completions", json=_chat(False)),
                   "task": c.post("/v1/caption", json={"image": b64(png_bytes()), "max_new_tokens": 4})}
    for route, r in refused.items():
        assert r.status_code == 503, (route, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), route  # an HTTP error, not an SSE stream
        assert r.json()["error"]["type"] == "overloaded", route
        assert int(r.headers.get("retry-after", "0")) >= 1, (route, dict(r.headers))
    assert done == [200, 200]


def test_the_old_flag_name_sets_the_slots_with_one_deprecation_line(server):
    log = server.log()
    assert log.count("--max-batch-size is deprecated") == 1, log
    assert log.count("--decode-budget-mpx is deprecated") == 1 and "--decode-budget-mb 143" in log, log
    with httpx.Client(base_url=server.url, headers=server.headers) as c:
        assert metric_samples(c.get("/metrics").text, "palikit_slots") == {"palikit_slots": 1.0}


def _refusal_after_filling(server, max_new_tokens: int) -> tuple[int, list[int]]:
    """The Retry-After of a caption refused by an engine filled with requests of `max_new_tokens` (and the
    two requests' statuses once they end)."""
    with _engine_filled(server, max_new_tokens) as done, server.client() as c:
        r = c.post("/v1/caption", json={"image": b64(png_bytes()), "max_new_tokens": 4})
    assert r.status_code == 503, r.text
    return int(r.headers["retry-after"]), done


def test_retry_after_follows_the_work_ahead_not_the_past(server):
    """Issue 38's risk: Retry-After said 8-27 s after long requests for 60 ms of work. After two long
    requests have run, a queue of short ones is refused with a Retry-After in proportion to them."""
    long_wait, done = _refusal_after_filling(server, LONG)
    short_wait, done_short = _refusal_after_filling(server, LONG // 10)
    assert done == done_short == [200, 200]
    assert long_wait >= 2 and short_wait <= max(1, -(-long_wait // 5)), (long_wait, short_wait)
