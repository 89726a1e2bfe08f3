"""The micro-batcher and the app's overload/timeout answers, in-process with a fake model (fast and
deterministic): batches are uniform in options and capped; a full queue answers 503 + Retry-After;
the per-request timeout answers 504 and expired requests never reach the model; one bad request in a
batch does not fail the others; shutdown answers waiting requests."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import b64, png_bytes

from palikit.serve import ServerSettings, create_app
from palikit.serve.batcher import MicroBatcher, QueueFull, Stopped


def run(coro):
    return asyncio.run(coro)


def test_batches_group_by_key_and_respect_the_size_cap():
    calls = []

    def run_batch(key, payloads):
        calls.append((key, list(payloads)))
        time.sleep(0.02)
        return [f"{key}:{p}" for p in payloads]

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=4, max_wait_ms=20, max_queue=100)
        await b.start()
        out = await asyncio.gather(*(b.submit("AB"[i % 2], i) for i in range(14)))
        await b.stop()
        return out

    out = run(main())
    assert out == [f"{'AB'[i % 2]}:{i}" for i in range(14)]
    assert all(len(p) <= 4 for _, p in calls)
    assert all(all(i % 2 == "AB".index(k) for i in p) for k, p in calls)  # uniform options per call
    assert sorted(i for _, p in calls for i in p) == list(range(14))
    assert max(len(p) for _, p in calls) == 4


def test_full_queue_refuses_at_once_with_retry_after():
    gate = threading.Event()

    def run_batch(key, payloads):
        gate.wait(5)
        return payloads

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=1, max_wait_ms=0, max_queue=2)
        await b.start()
        first = asyncio.ensure_future(b.submit("k", 0))
        await asyncio.sleep(0.05)  # first is running, the queue is empty
        queued = [asyncio.ensure_future(b.submit("k", i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as e:
            await b.submit("k", 3)
        assert e.value.retry_after_s >= 1
        gate.set()
        out = await asyncio.gather(first, *queued)
        await b.stop()
        return out

    assert run(main()) == [0, 1, 2]


def test_timeout_and_expired_requests_never_run():
    ran = []

    def run_batch(key, payloads):
        ran.extend(payloads)
        time.sleep(0.3)
        return payloads

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=1, max_wait_ms=0, max_queue=10)
        await b.start()
        slow = asyncio.ensure_future(b.submit("k", "first", timeout_s=0.1))
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(b.submit("k", "second", timeout_s=0.1))
        for fut in (slow, waiting):
            with pytest.raises(asyncio.TimeoutError):
                await fut
        await asyncio.sleep(0.4)
        await b.stop()

    run(main())
    assert ran == ["first"]  # "second" expired in the queue and was dropped


def test_one_bad_request_does_not_fail_its_batch():
    def run_batch(key, payloads):
        if "bad" in payloads:
            raise ValueError("bad request")
        return [p.upper() for p in payloads]

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=8, max_wait_ms=30, max_queue=10)
        await b.start()
        out = await asyncio.gather(*(b.submit("k", p) for p in ["a", "bad", "c"]), return_exceptions=True)
        await b.stop()
        return out

    a, bad, c = run(main())
    assert (a, c) == ("A", "C") and isinstance(bad, ValueError)


def test_stop_answers_waiting_requests():
    def run_batch(key, payloads):
        time.sleep(0.2)
        return payloads

    async def main():
        b = MicroBatcher(run_batch, max_batch_size=1, max_wait_ms=0, max_queue=10)
        await b.start()
        futs = [asyncio.ensure_future(b.submit("k", i)) for i in range(3)]
        await asyncio.sleep(0.05)
        await b.stop()
        out = await asyncio.gather(*futs, return_exceptions=True)
        with pytest.raises(Stopped):
            await b.submit("k", 9)
        return out

    out = run(main())
    assert any(isinstance(o, Stopped) for o in out)


# ------------------------------------------------------------------------------ app level
class SlowFakeModel:
    """Enough of `PaliGemma` for the app: sleeps `delay` s per model call."""

    name = "fake"

    def __init__(self, delay: float):
        self.delay = delay
        self.tokenizer = SimpleNamespace(encode_prompt=lambda p: SimpleNamespace(ids=p.split()))
        self.model = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(num_image_tokens=4)))

    def predict_batch(self, images, prompts, **kw):
        time.sleep(self.delay)
        return [SimpleNamespace(tokens=[1], text=p, to_dict=lambda p=p: {"text": p}) for p in prompts]


async def _with_app(settings: ServerSettings, model, body):
    app = create_app(model, settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await body(client)


def test_app_answers_503_with_retry_after_and_504_on_timeout():
    settings = ServerSettings(max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout_s=0.5, warmup=False)
    req = {"image": b64(png_bytes(8, 8)), "prompt": "caption en"}

    async def body(client):
        calls = [asyncio.ensure_future(client.post("/v1/predict", json=req)) for _ in range(4)]
        return await asyncio.gather(*calls)

    responses = run(_with_app(settings, SlowFakeModel(0.3), body))
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    r503 = next(r for r in responses if r.status_code == 503)
    assert int(r503.headers["retry-after"]) >= 1 and r503.json()["error"]["type"] == "overloaded"

    async def timeout_body(client):
        return await client.post("/v1/predict", json=req)

    r = run(_with_app(settings, SlowFakeModel(1.0), timeout_body))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
