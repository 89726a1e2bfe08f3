"""Continuous batching equivalences: every request's tokens under continuous batching (arrivals at
random decode steps, mixed prompt lengths, budgets and options, more requests than slots) equal the
same request run alone, greedy and seeded sampling; a seeded request's answer does not depend on its
batch mates; cancelled and finished requests free their slots; the compiled step equals eager."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from helpers.models import requests_for

from palikit.engine import Engine, GenerationOptions, QueueFull, Request, SamplingOptions

OPTION_MIX = [
    GenerationOptions(max_new_tokens=3),
    GenerationOptions(max_new_tokens=17),
    GenerationOptions(max_new_tokens=9, sampling=SamplingOptions(temperature=1.3, seed=11)),
    GenerationOptions(max_new_tokens=12, sampling=SamplingOptions(temperature=0.8, top_k=5, seed=3)),
    GenerationOptions(max_new_tokens=25, ignore_eos=True),
    GenerationOptions(max_new_tokens=14, sampling=SamplingOptions(temperature=1.0, top_p=0.6, seed=99)),
]


def _workload(model, n=14, seed=0):
    rng = random.Random(seed)
    reqs = requests_for(model, n=n, seed=seed, frames=(1, 2, 1, 1))
    reqs[3] = Request([2, 11, 12, 13, 7], None)  # text-only row
    return [(r, OPTION_MIX[rng.randrange(len(OPTION_MIX))]) for r in reqs], rng


def _alone(model, workload):
    engine = Engine(model, max_slots=1)
    out = [engine.submit(r, o).result() for r, o in workload]
    engine.close()
    return out


def test_arrivals_at_random_steps_equal_each_request_alone(models, kind):
    model = models[kind]
    workload, rng = _workload(model)
    alone = _alone(model, workload)
    engine = Engine(model, max_slots=4)
    sched = engine.scheduler
    # 3 requests at once, the rest arrive at random decode steps (from the engine thread itself)
    plan: dict[int, list] = {}
    for item in workload[3:]:
        plan.setdefault(rng.randrange(1, 30), []).append(item)
    tickets, lock = [None] * len(workload), threading.Lock()
    index = {id(item): i for i, item in enumerate(workload)}

    def on_step(step):
        for item in plan.pop(step, []):
            with lock:
                tickets[index[id(item)]] = engine.submit(*item)
        if plan and not sched._live and not sched._queue:  # idle before the plan ran out: submit the rest
            for step_items in list(plan.values()):
                for item in step_items:
                    tickets[index[id(item)]] = engine.submit(*item)
            plan.clear()

    sched.on_step = on_step
    for i in range(3):
        tickets[i] = engine.submit(*workload[i])
    for _ in range(200):
        if all(t is not None and t.future.done() for t in tickets):
            break
        threading.Event().wait(0.05)
    got = [t.result(timeout=30) for t in tickets]
    assert sched.decode_slot_steps / sched.decode_steps > 1.5  # they really shared steps
    for (req, opts), a, g in zip(workload, alone, got):
        assert g.tokens == a.tokens, (opts, a.tokens, g.tokens)
        assert g.finished == a.finished
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
        assert len(g.tokens) <= opts.max_new_tokens
    engine.close()


def test_seeded_request_ignores_its_batch_mates(models):
    model = models["pg2"]
    req = requests_for(model, n=1)[0]
    opts = GenerationOptions(max_new_tokens=12, sampling=SamplingOptions(temperature=1.5, seed=7))
    solo = Engine(model, max_slots=1).submit(req, opts).result().tokens
    engine = Engine(model, max_slots=8)
    others = [engine.submit(r, GenerationOptions(10, sampling=SamplingOptions(temperature=1.0)))
              for r in requests_for(model, n=3, seed=5)]
    same = [engine.submit(req, opts) for _ in range(8)]
    assert all(t.result().tokens == solo for t in same)
    assert [t.result() for t in others]
    differs = engine.submit(req, GenerationOptions(12, sampling=SamplingOptions(temperature=1.5, seed=8))).result()
    assert differs.tokens != solo


def test_more_requests_than_slots_and_slots_are_freed(models):
    model = models["pg1"]
    reqs = requests_for(model, n=9, seed=2)
    opts = GenerationOptions(max_new_tokens=6)
    alone = [Engine(model, max_slots=1).generate([r], opts)[0].tokens for r in reqs]
    engine = Engine(model, max_slots=2)
    assert [g.tokens for g in engine.generate(reqs, opts)] == alone
    assert engine.scheduler.stats()["live_slots"] == 0
    assert engine.scheduler.batch.host_live == [False, False]


def test_cancel_frees_the_slot_and_queue_full_is_refused(models):
    model = models["pg1"]
    req = requests_for(model, n=1)[0]
    engine = Engine(model, max_slots=1, max_queue=1)
    gate = threading.Event()
    engine.scheduler.on_step = lambda step: gate.wait(5)
    long = engine.submit(req, GenerationOptions(max_new_tokens=200, ignore_eos=True))
    for _ in range(200):  # wait until it holds the only slot
        if long.t_first_token is not None:
            break
        threading.Event().wait(0.02)
    queued = engine.submit(req, GenerationOptions(max_new_tokens=4))
    with pytest.raises(QueueFull):
        engine.submit(req, GenerationOptions(max_new_tokens=4))
    long.cancel()
    gate.set()
    engine.scheduler.on_step = None
    assert queued.result(timeout=30).tokens == Engine(model).generate([req], GenerationOptions(4))[0].tokens
    assert long.future.cancelled()
    assert len(long.tokens) < 200


def test_on_token_sees_every_token_in_order(models):
    model = models["pg2"]
    req = requests_for(model, n=1)[0]
    seen = []
    gen = Engine(model).submit(req, GenerationOptions(max_new_tokens=10), on_token=lambda t, lp: seen.append(t)).result()
    assert seen == gen.tokens and gen.tokens


@pytest.mark.slow  # torch.compile of the step
def test_compiled_step_equals_eager(models):
    model = models["pg2-sliding"]
    workload, _ = _workload(model, n=6, seed=4)
    eager = [Engine(model, max_slots=4).generate([r], o)[0].tokens for r, o in workload]
    compiled = Engine(model, max_slots=4, compile=True)
    tickets = [compiled.submit(r, o) for r, o in workload]
    assert [t.result(timeout=600).tokens for t in tickets] == eager


def test_cache_grows_for_a_long_request_while_others_decode(models):
    model = models["pg1"]
    short, long = requests_for(model, n=2, seed=6)
    opts_short, opts_long = GenerationOptions(max_new_tokens=40, ignore_eos=True), GenerationOptions(max_new_tokens=90, ignore_eos=True)
    alone = [Engine(model, max_slots=1, max_len=256).generate([r], o)[0].tokens
             for r, o in ((short, opts_short), (long, opts_long))]
    engine = Engine(model, max_slots=2, max_len=64)  # 64 slots per row: the long request needs more
    tickets = [engine.submit(short, opts_short), engine.submit(long, opts_long)]
    assert [t.result(timeout=60).tokens for t in tickets] == alone
    assert engine.scheduler.batch.max_len >= 90


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(models, monkeypatch):
    model = models["pg1"]
    req = requests_for(model, n=1)[0]
    engine = Engine(model, max_slots=2)
    expected = engine.generate([req], GenerationOptions(5))[0].tokens
    batch = engine.scheduler.batch
    real = batch.step
    monkeypatch.setattr(batch, "step", lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.submit(req, GenerationOptions(5)).result(timeout=30)
    monkeypatch.setattr(batch, "step", real)
    assert engine.submit(req, GenerationOptions(5)).result(timeout=30).tokens == expected


@pytest.mark.slow
def test_bench_reports_both_engines_and_consistent_figures():
    from palikit.weights.resolve import get_config
    from palikit.bench.inference import run_bench

    report = run_bench(get_config("tiny-pg1"), batch_sizes=(1, 3), new_tokens=6, repeats=1, compile=True)
    engines = {(r["engine"], r["batch_size"]) for r in report["rows"]}
    assert engines == {(e, b) for e in ("palikit (compiled)", "palikit", "transformers") for b in (1, 3)}
    for r in report["rows"]:
        assert r["prefill_ms"] > 0 and r["decode_step_ms"] > 0 and r["images_per_s"] > 0
    eager = {r["batch_size"]: r for r in report["rows"] if r["engine"] == "palikit"}
    compiled = {r["batch_size"]: r for r in report["rows"] if r["engine"] == "palikit (compiled)"}
    for b, ratio in report["compile_speedup"].items():
        assert ratio == pytest.approx(eager[int(b)]["decode_step_ms"] / compiled[int(b)]["decode_step_ms"])
    assert report["torch_threads"] >= 1
