"""The server's engine front and the app's overload/timeout answers, in-process with a fake model
(fast and deterministic): the engine's refusal (QueueFull and ITS Retry-After) passes through the front
unchanged, with no bound of the front's own; options reach the model as the one `PredictOptions`; a
timed-out or abandoned request is cancelled in the engine; the per-request timeout answers 504; one
bad request does not fail the others; shutdown refuses new requests; one error mapping answers the
same 503 + Retry-After to a task endpoint, a chat and a streaming chat."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import b64, data_url, png_bytes

from palikit.engine import Closed, QueueFull
from palikit.serve import ServerSettings, create_app
from palikit.serve.front import EngineFront, Item
from palikit.tasks.options import PredictOptions

RETRY_AFTER = 7  # the fake engine's estimate: what every refusal must carry


def run(coro):
    return asyncio.run(coro)


class FakePending:
    def __init__(self, value, delay):
        self.future = concurrent.futures.Future()
        self.cancelled = False
        self.value = value
        self.t_submit = time.perf_counter()
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
    """Enough of `PaliGemma` for the app: each generation takes `delay` s, all concurrently; the fake
    engine holds at most `capacity` unfinished requests and refuses more with QueueFull(RETRY_AFTER)."""

    name = "fake"

    def __init__(self, delay: float, capacity: int = 100):
        self.delay, self.capacity = delay, capacity
        self.submitted: list[FakePending] = []
        self.options: list = []
        self.model = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(num_image_tokens=4)))

    def encode_prompt(self, prompt):
        return prompt.split()

    def submit(self, image, prompt, *, prompt_ids=None, labels=None, options=None, on_text=None):
        self.options.append(options)
        if prompt == "bad":
            raise ValueError("bad request")
        if sum(not p.future.done() and not p.cancelled for p in self.submitted) >= self.capacity:
            raise QueueFull(RETRY_AFTER)
        result = SimpleNamespace(tokens=[1], text=prompt.upper(), to_dict=lambda p=prompt: {"text": p})
        self.submitted.append(FakePending(result, self.delay))
        return self.submitted[-1]


def _item(prompt: str = "p") -> Item:
    return Item(None, prompt, prompt.split(), None)


OPTS = PredictOptions(max_new_tokens=3)


def test_the_engines_refusal_passes_through_with_its_retry_after():
    model = SlowFakeModel(0.3, capacity=2)

    async def main():
        front = EngineFront(model, max_slots=1, max_queue=1)
        await front.start()
        jobs = [asyncio.ensure_future(front.run(_item(), OPTS, 5)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull) as full:
            await front.run(_item(), OPTS, 5)
        out = await asyncio.gather(*jobs)
        await front.stop()
        return full.value, out

    full, out = run(main())
    assert full.retry_after_s == RETRY_AFTER  # the engine's estimate, not one of the front's
    assert [r.text for r in out] == ["P"] * 2
    assert all(o is OPTS for o in model.options)  # the one PredictOptions, not a dict rebuilt


def test_the_front_adds_no_bound_of_its_own():
    model = SlowFakeModel(0.2)

    async def main():
        front = EngineFront(model, max_slots=1, max_queue=1)  # 1 + 1, but the engine takes 100
        await front.start()
        return await asyncio.gather(*(front.run(_item(), OPTS, 5) for _ in range(6)))

    assert [r.text for r in run(main())] == ["P"] * 6


def test_timeout_cancels_the_request_in_the_engine():
    model = SlowFakeModel(1.0)

    async def main():
        front = EngineFront(model, max_slots=1, max_queue=1)
        await front.start()
        with pytest.raises(asyncio.TimeoutError):
            await front.run(_item(), OPTS, 0.2)

    run(main())
    assert model.submitted and model.submitted[0].cancelled


def test_one_bad_request_does_not_fail_the_others():
    async def main():
        front = EngineFront(SlowFakeModel(0.05), max_slots=4, max_queue=4)
        await front.start()
        return await asyncio.gather(*(front.run(_item(p), OPTS, 5) for p in ["a", "bad", "c"]),
                                    return_exceptions=True)

    a, bad, c = run(main())
    assert (a.text, c.text) == ("A", "C") and isinstance(bad, ValueError)


def test_stop_refuses_new_requests():
    async def main():
        front = EngineFront(SlowFakeModel(0.01), max_slots=1, max_queue=1)
        await front.start()
        await front.stop()
        with pytest.raises(Closed):
            await front.run(_item(), OPTS, 5)

    run(main())


# ------------------------------------------------------------------------------ app level
async def _with_app(settings: ServerSettings, model, body):
    app = create_app(model, settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await body(client)


SETTINGS = ServerSettings(max_slots=1, max_queue=1, request_timeout_s=0.5, warmup=False)
TASK = {"image": b64(png_bytes(8, 8)), "prompt": "caption en"}


def _chat(stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                       {"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}]}],
            "stream": stream}


@pytest.mark.parametrize("path, body", [("/v1/predict", TASK), ("/v1/chat/completions", _chat(False)),
                                        ("/v1/chat/completions", _chat(True))], ids=["task", "chat", "stream"])
def test_every_route_answers_the_engines_refusal_as_503_with_its_retry_after(path, body):
    async def main(client):
        busy = [asyncio.ensure_future(client.post("/v1/predict", json=TASK)) for _ in range(2)]
        await asyncio.sleep(0.1)  # both in the (fake) engine: it is full
        refused = await client.post(path, json=body)
        return refused, await asyncio.gather(*busy)

    refused, busy = run(_with_app(SETTINGS, SlowFakeModel(0.4, capacity=2), main))
    assert [r.status_code for r in busy] == [200, 200]
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == str(RETRY_AFTER)
    assert refused.json()["error"]["type"] == "overloaded"


def test_504_on_timeout():
    async def timeout_body(client):
        return await client.post("/v1/predict", json=TASK)

    r = run(_with_app(SETTINGS, SlowFakeModel(1.0), timeout_body))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
