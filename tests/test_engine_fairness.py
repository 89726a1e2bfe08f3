"""Issue 38 in the engine (fast, in-process): beam search is a stepwise job (interleaved with the slots'
decode steps, a few at once, cancellable, same tokens as run whole); a huge top_k is clamped and a row
whose options the batch tensors cannot hold is refused alone at submit; prefill_ms does not tell a
cached image from a new one (the feature cache is shared by every client); Retry-After comes from the
work ahead, not a mean over past requests."""

from __future__ import annotations

import time

import torch
from helpers.models import requests_for

from palikit.engine import Engine, GenerationOptions, QueueFull, Request, SamplingOptions
from palikit.engine.features import pixel_key
from palikit.engine import scheduler as scheduler_module
from palikit.engine.beam import beam_search

BEAM = GenerationOptions(max_new_tokens=40, num_beams=3, length_penalty=0.0, ignore_eos=True)


def test_beam_jobs_interleave_with_decode_steps_and_equal_the_whole_run(models):
    model = models["pg2"]
    req, other = requests_for(model, n=2, seed=4)
    engine = Engine(model, max_slots=2)
    whole = beam_search(engine, [req], BEAM)[0]  # (no scheduler thread yet: run in this thread)
    steps_seen = []
    engine.scheduler.on_step = lambda step: steps_seen.append(len(engine.scheduler._running_jobs))
    beams = [engine.submit(req, BEAM) for _ in range(4)]
    plain = engine.submit(other, GenerationOptions(max_new_tokens=5, ignore_eos=True)).result(timeout=60)
    assert len(plain.tokens) == 5
    assert not all(b.future.done() for b in beams)  # the plain request did not wait for the beams
    results = [b.result(timeout=120) for b in beams]
    assert all(r.tokens == whole.tokens for r in results)
    assert max(steps_seen) <= engine.scheduler.max_jobs
    engine.close()


def test_a_cancelled_beam_job_stops_at_its_next_step(models):
    model = models["pg2"]
    (req,) = requests_for(model, n=1, seed=5)
    engine = Engine(model, max_slots=2)
    long = GenerationOptions(max_new_tokens=400, num_beams=4, ignore_eos=True)
    tickets = [engine.submit(req, long) for _ in range(6)]
    time.sleep(0.2)
    for t in tickets:
        t.cancel()
    deadline = time.monotonic() + 5
    while engine.scheduler._running_jobs or engine.scheduler._jobs:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert all(t.future.cancelled() for t in tickets)
    engine.close()


def test_huge_top_k_is_clamped_and_a_bad_row_is_refused_alone(models):
    model = models["pg2"]
    reqs = requests_for(model, n=3, seed=6)
    engine = Engine(model, max_slots=4)
    seeded = SamplingOptions(temperature=0.9, seed=3)
    huge = GenerationOptions(max_new_tokens=6, sampling=SamplingOptions(temperature=0.9, seed=3, top_k=2**63))
    plain = GenerationOptions(max_new_tokens=6, sampling=seeded)
    assert engine.submit(reqs[0], huge).result().tokens == engine.submit(reqs[0], plain).result().tokens
    bad = GenerationOptions(max_new_tokens=6, sampling=SamplingOptions(temperature=0.9, seed=2**64))
    try:
        engine.submit(reqs[1], bad)
        raise AssertionError("a seed beyond int64 was accepted")
    except ValueError as e:
        assert "sampling options" in str(e)
    engine.close()


def test_prefill_ms_does_not_tell_a_cached_image_from_a_new_one(models, monkeypatch):
    model = models["pg2"]
    (req,) = requests_for(model, n=1, seed=7)
    real = scheduler_module.encode_requests

    def slow_tower(m, requests, cache):  # a tower that takes 0.3 s when it runs (a cache miss)
        misses = cache.misses
        real(m, requests, cache)
        if cache.misses > misses:
            time.sleep(0.3)

    monkeypatch.setattr(scheduler_module, "encode_requests", slow_tower)
    engine = Engine(model, max_slots=2)
    opts = GenerationOptions(max_new_tokens=3)
    S = model.config.vision.image_size
    pixels = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(7)) * 2 - 1

    def with_pixels():  # a fresh request for the same image: the tower runs once, then the cache answers
        return Request(list(req.text_ids), pixel_values=pixels, pixel_key=pixel_key(pixels))

    miss = engine.submit(with_pixels(), opts).result()
    hit = engine.submit(with_pixels(), opts).result()
    assert engine.scheduler.image_cache.hits >= 1
    assert miss.timings["prefill_ms"] < 150 and hit.timings["prefill_ms"] < 150, (miss.timings, hit.timings)
    engine.close()


def test_retry_after_comes_from_the_work_ahead(models):
    model = models["pg2"]
    reqs = requests_for(model, n=3, seed=8)
    engine = Engine(model, max_slots=1, max_queue=1)
    sched = engine.scheduler
    engine.submit(reqs[0], GenerationOptions(max_new_tokens=200, ignore_eos=True)).result()  # a long one, gone
    sched._step_s = 0.01  # (pin the measured step time: the figure below is then exact)
    sched.on_step = lambda step: time.sleep(0.05)  # hold the engine while the queue fills
    engine.submit(reqs[1], GenerationOptions(max_new_tokens=8, ignore_eos=True))
    engine.submit(reqs[2], GenerationOptions(max_new_tokens=8, ignore_eos=True))
    try:
        engine.submit(reqs[0], GenerationOptions(max_new_tokens=8))
        raise AssertionError(f"not refused: {sched.stats()}")
    except QueueFull as e:
        assert e.retry_after_s == 1  # <= 16 steps ahead x ~10 ms, whatever ran before
    sched._queue[0].options = GenerationOptions(max_new_tokens=1000)
    sched._step_s = 0.01
    assert sched.retry_after() >= 10  # 1000 steps ahead x 10 ms
    engine.close()
