"""Load test (runs in CI; about a minute on a 2-core machine): 2,000 requests from 32 concurrent
clients against a real server process on loopback, mixing task endpoints, multipart and JSON, and
OpenAI chat. Every answer must equal the in-process model's; batching must show in /metrics
(batches > 1); p50/p99 latency and throughput are printed; the server's RSS must stay flat."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import b64, data_url, metric_samples, one_thread, png_bytes, reference_model, server_fixture

pytestmark = pytest.mark.slow  # real server processes under load

N_REQUESTS = 2000
CLIENTS = 32
WARMUP = 200           # requests before the first RSS reading
MAX_RSS_GROWTH_MB = 48  # after warm-up; a leak of a few KB per request would exceed it


server = server_fixture("--max-slots", "16")


def _specs(pg):
    """64 distinct requests with their expected answer text."""
    images = [png_bytes(24 + 5 * i, 20 + 3 * i, seed=500 + i) for i in range(8)]
    specs = []
    with one_thread():
        for i, data in enumerate(images):
            im = Image.open(io.BytesIO(data))
            for j, (prompt, mnt) in enumerate([("caption en", 6), ("ocr", 9), ("detect cat ; dog", 6),
                                               ("answer en what is it", 9)]):
                text = pg.predict(im, prompt, max_new_tokens=mnt).text
                kind = (i + j) % 4
                if kind == 0:
                    req = ("/v1/predict", {"json": {"image": b64(data), "prompt": prompt, "max_new_tokens": mnt}})
                elif kind == 1:
                    req = ("/v1/predict", {"files": {"image": ("x.png", data, "image/png")},
                                           "data": {"prompt": prompt, "max_new_tokens": str(mnt)}})
                elif kind == 2:
                    req = ("/v1/chat/completions", {"json": {"model": "tiny", "max_tokens": mnt, "messages": [
                        {"role": "user", "content": [{"type": "text", "text": prompt},
                                                     {"type": "image_url", "image_url": {"url": data_url(data)}}]}]}})
                else:
                    req = ("/v1/predict", {"json": {"image": b64(data), "prompt": prompt, "max_new_tokens": mnt,
                                                    "temperature": 0.0}})
                specs.append((req, text))
                # the same image and prompt with a second token budget: a different options group
                text2 = pg.predict(im, prompt, max_new_tokens=mnt + 3).text
                specs.append((("/v1/predict", {"json": {"image": b64(data), "prompt": prompt,
                                                        "max_new_tokens": mnt + 3}}), text2))
    return specs


async def _drive(server, specs, n: int, latencies: list, failures: list):
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120, limits=limits) as client:
        async def worker():
            for i in counter:
                (path, kwargs), expected = specs[i % len(specs)]
                t0 = time.perf_counter()
                r = await client.post(path, **kwargs)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures.append((i, r.status_code, r.text[:200]))
                    continue
                body = r.json()
                text = body["choices"][0]["message"]["content"] if "choices" in body else body["text"]
                if text != expected:
                    failures.append((i, "wrong answer", text, expected))

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))


def test_2000_requests_from_32_clients(server, capsys):
    specs = _specs(reference_model())
    warm_lat, warm_fail = [], []
    asyncio.run(_drive(server, specs, WARMUP, warm_lat, warm_fail))
    assert not warm_fail, warm_fail[:3]
    rss_start = server.rss_mb()
    before = metric_samples(httpx.get(server.url + "/metrics", headers=server.headers).text, "palikit_")

    latencies, failures = [], []
    t0 = time.perf_counter()
    asyncio.run(asyncio.wait_for(_drive(server, specs, N_REQUESTS, latencies, failures), timeout=600))
    wall = time.perf_counter() - t0
    rss_end = server.rss_mb()
    metrics = httpx.get(server.url + "/metrics", headers=server.headers).text
    after = metric_samples(metrics, "palikit_")

    assert not failures, f"{len(failures)} failures, e.g. {failures[:3]}"
    assert len(latencies) == N_REQUESTS
    steps = after["palikit_decode_steps"] - before["palikit_decode_steps"]
    occupancy = (after["palikit_decode_slot_steps"] - before["palikit_decode_slot_steps"]) / steps
    generations = after["palikit_generation_duration_seconds_count"] - before["palikit_generation_duration_seconds_count"]
    lat = np.array(latencies) * 1e3
    report = (f"\n[serve load] {N_REQUESTS} requests, {CLIENTS} clients: {N_REQUESTS / wall:.1f} req/s over {wall:.1f} s; "
              f"latency p50 {np.percentile(lat, 50):.0f} ms, p90 {np.percentile(lat, 90):.0f} ms, "
              f"p99 {np.percentile(lat, 99):.0f} ms, max {lat.max():.0f} ms; "
              f"{steps:.0f} decode steps, {occupancy:.1f} live slots per step on average; "
              f"server RSS {rss_start:.0f} -> {rss_end:.0f} MB")
    with capsys.disabled():
        print(report)
    assert generations == N_REQUESTS
    assert occupancy > 2, "continuous batching is not decoding concurrent requests together"
    assert rss_end - rss_start < MAX_RSS_GROWTH_MB, report
    ok = 'palikit_requests_total{endpoint="/v1/predict",status="200"}'
    assert ok in metrics
    assert server.alive()
