"""The server's engine front and the app's overload/timeout answers, in-process with a fake model
(fast and deterministic): admission stops at slots + queue with 503 + Retry-After; a timed-out or
abandoned request is cancelled in the engine; the per-request timeout answers 504; one bad request
does not fail the others; shutdown refuses new requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import b64, png_bytes

from palikit.serve import ServerSettings, create_app
from palikit.serve.batcher import EngineFront, QueueFull, Stopped


def run(coro):
    return asyncio.run(coro)


class FakePending:
    def __init__(self, value, delay):
        self.future = concurrent.futures.Future()
        self.cancelled = False
        self.value = value
        threading.Timer(delay, self._finish).start()

    def _finish(self):
        if not self.future.done():
            self.future.set_result(self.value)

    def cancel(self):
        self.cancelled = True

    def result(self, timeout=None):
        self.future.result(timeout)
        return self.value


class SlowFakeModel:
    """Enough of `PaliGemma` for the app: each generation takes `delay` s, all concurrently."""

    name = "fake"

    def __init__(self, delay: float):
        self.delay = delay
        self.submitted: list[FakePending] = []
        self.tokenizer = SimpleNamespace(encode_prompt=lambda p: SimpleNamespace(ids=p.split()))
        self.model = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(num_image_tokens=4)))

    def submit(self, image, prompt, labels=None, on_text=None, **options):
        if prompt == "bad":
            raise ValueError("bad request")
        result = SimpleNamespace(tokens=[1], text=prompt.upper(), to_dict=lambda p=prompt: {"text": p})
        self.submitted.append(FakePending(result, self.delay))
        return self.submitted[-1]


def test_admission_stops_at_slots_plus_queue_with_retry_after():
    async def main():
        front = EngineFront(SlowFakeModel(0.3), max_slots=2, max_queue=1)
        await front.start()
        jobs = [asyncio.ensure_future(front.run(None, "p", None, {}, 5)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as full:
            await front.run(None, "p", None, {}, 5)
        out = await asyncio.gather(*jobs)
        await front.stop()
        return full.value, out

    full, out = run(main())
    assert full.retry_after_s >= 1
    assert [r.text for r in out] == ["P"] * 3


def test_timeout_cancels_the_request_in_the_engine():
    model = SlowFakeModel(1.0)

    async def main():
        front = EngineFront(model, max_slots=1, max_queue=1)
        await front.start()
        with pytest.raises(asyncio.TimeoutError):
            await front.run(None, "p", None, {}, 0.2)
        return front.in_flight

    assert run(main()) == 0
    assert model.submitted and model.submitted[0].cancelled


def test_one_bad_request_does_not_fail_the_others():
    async def main():
        front = EngineFront(SlowFakeModel(0.05), max_slots=4, max_queue=4)
        await front.start()
        return await asyncio.gather(*(front.run(None, p, None, {}, 5) for p in ["a", "bad", "c"]),
                                    return_exceptions=True)

    a, bad, c = run(main())
    assert (a.text, c.text) == ("A", "C") and isinstance(bad, ValueError)


def test_stop_refuses_new_requests():
    async def main():
        front = EngineFront(SlowFakeModel(0.01), max_slots=1, max_queue=1)
        await front.start()
        await front.stop()
        with pytest.raises(Stopped):
            await front.run(None, "p", None, {}, 5)

    run(main())


# ------------------------------------------------------------------------------ app level
async def _with_app(settings: ServerSettings, model, body):
    app = create_app(model, settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await body(client)


def test_app_answers_503_with_retry_after_and_504_on_timeout():
    settings = ServerSettings(max_batch_size=1, max_queue=1, request_timeout_s=0.5, warmup=False)
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
