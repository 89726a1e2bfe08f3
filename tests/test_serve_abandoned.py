"""Issue 38 S1 + S2 on a real server: work nobody waits for any more is dropped, and beam search
cannot starve the engine.

S1: clients that send long /v1/predict requests and leave after 0.3 s free their slots at once (the
task endpoints listen for the disconnect while they wait), so a caption sent next answers in well
under a second and `palikit_client_aborts_total` counts them. (main: every abandoned request ran out
its 512-token budget; the caption waited for all of them.)
S2: beam requests run a step at a time between the engine's decode steps, a few at once, and stop
when their timeout cancels them: a caption sent behind 16 of them answers at once, and one sent after
they all timed out is not stuck behind their leftovers. (main: beam search ran whole on the engine
thread, queued calls ran after their clients had long got a 504.)
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from serve_helpers import b64, metric_samples, png_bytes, server_fixture

pytestmark = pytest.mark.slow

server = server_fixture("--max-slots", "4", "--timeout", "3")
IMAGE = b64(png_bytes(seed=3))


def _caption_seconds(srv) -> float:
    with srv.client() as c:
        t0 = time.perf_counter()
        r = c.post("/v1/caption", json={"image": IMAGE, "max_new_tokens": 4})
        took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return took


def _post_and_leave(srv, body: dict, after_s: float) -> str:
    try:
        with httpx.Client(base_url=srv.url, headers=srv.headers, timeout=after_s) as c:
            return str(c.post("/v1/predict", json=body).status_code)
    except httpx.TimeoutException:
        return "left"


def _engine(srv) -> dict[str, float]:
    with srv.client() as c:
        text = c.get("/metrics").text
    return {name: sum(metric_samples(text, name).values()) for name in
            ("palikit_client_aborts_total", "palikit_decode_slot_steps", "palikit_live_slots", "palikit_engine_queued")}


def test_abandoned_requests_are_cancelled_and_counted(server):
    n = 24  # 6 waves of the 4 slots; each would run 512 decode steps (~0.7 s alone on this model)
    before = _engine(server)
    body = {"image": IMAGE, "prompt": "caption en", "max_new_tokens": 512}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda _: _post_and_leave(server, body, 0.3), range(n)))
    assert outcomes.count("left") == n, outcomes
    took = _caption_seconds(server)
    print(f"caption latency after {n} abandoned 512-token requests: {took * 1e3:.0f} ms")
    assert took < 1.0
    deadline = time.monotonic() + 5
    while (after := _engine(server))["palikit_client_aborts_total"] - before["palikit_client_aborts_total"] < n:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.1)
    assert after["palikit_live_slots"] == 0 and after["palikit_engine_queued"] == 0
    slot_steps = after["palikit_decode_slot_steps"] - before["palikit_decode_slot_steps"]
    assert slot_steps < n * 512 / 4, slot_steps  # main: ~n * 512 (every budget run out)


def test_beam_requests_cannot_starve_the_engine(server):
    n = 16
    body = {"image": IMAGE, "prompt": "caption en", "max_new_tokens": 512, "num_beams": 4}

    def beam(_):
        with server.client(timeout=30) as c:
            return c.post("/v1/predict", json=body).status_code

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(beam, i) for i in range(n)]
        time.sleep(0.5)
        took = _caption_seconds(server)  # behind 16 beam requests
        statuses = [f.result() for f in futures]
    print(f"caption latency behind {n} beam requests: {took * 1e3:.0f} ms; beam statuses {sorted(statuses)}")
    assert took < 1.0
    assert set(statuses) <= {200, 504} and 504 in statuses  # 16 x 512 beam steps do not fit in --timeout 3
    took_after = _caption_seconds(server)  # the timed-out ones were cancelled, not run for nobody
    assert took_after < 1.0
    state = _engine(server)
    assert state["palikit_engine_queued"] == 0 and state["palikit_live_slots"] == 0
