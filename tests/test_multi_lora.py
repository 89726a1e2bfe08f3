"""Multi-LoRA in the continuous batch (issue 34): a request on adapter X in a mixed batch gives the
tokens (exactly) and log-probs (1e-4) of the same request run alone on the base model with X merged
(`weights.adapter.merge_adapter`, the existing merge path), whatever shares its batch: arrivals at
random decode steps, 4 adapters of ranks 2-8 on different modules (decoder only, vision tower +
projector, both) plus the base model, greedy and seeded sampling, fewer device slots than adapters
(requests wait for a slot), loads and unloads under load."""

from __future__ import annotations

import copy
import random
import time

import pytest
import torch

from helpers.lora import targets, write_peft_adapter
from palikit.engine import Engine, GenerationOptions, Request, SamplingOptions
from palikit.engine.adapters import AdapterError, UnknownAdapter
from palikit.engine.features import pixel_key
from palikit.weights.adapter import merge_adapter, read_adapter

ADAPTERS = {  # name: (rank, alpha, peft target_modules)
    "dec4": (4, 8.0, targets(decoder="q_proj|v_proj")),
    "dec8": (8, 4.0, targets(decoder="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj")),
    "tower2": (2, 4.0, targets(tower="q_proj|fc1", projector=True)),
    "both6": (6, 12.0, targets(decoder="o_proj|down_proj", tower="out_proj|fc2")),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from palikit.testing import make_tiny_checkpoint
    from palikit.weights.hf import load_hf_checkpoint

    root = tmp_path_factory.mktemp("mlora")
    base_dir = make_tiny_checkpoint(root / "base", "pg2", seed=1)
    paths = {name: write_peft_adapter(base_dir, root / name, r=r, alpha=a, target_modules=t, seed=i)
             for i, (name, (r, a, t)) in enumerate(ADAPTERS.items())}
    model = load_hf_checkpoint(base_dir).eval()
    merged = {None: model}
    for name, path in paths.items():
        merged[name] = merge_adapter(copy.deepcopy(model), path)
    return base_dir, paths, model, merged


def _requests(model, n, seed=0):
    """`n` requests on 3 distinct images (shared across adapters: the feature cache must key on the
    tower adapter), prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    S = model.config.vision.image_size
    images = [torch.rand(1, 3, S, S, generator=g) * 2 - 1 for _ in range(3)]
    out = []
    for i in range(n):
        pv = images[i % 3]
        text = [model.config.bos_token_id] + torch.randint(3, 300, (2 + i % 5,), generator=g).tolist() + [7]
        out.append(Request(text, pixel_values=pv, pixel_key=pixel_key(pv)))
    return out


def _options(i, adapter):
    sampling = SamplingOptions() if i % 2 == 0 else SamplingOptions(temperature=0.9, top_k=40, seed=100 + i)
    return GenerationOptions(max_new_tokens=4 + (i * 3) % 9, sampling=sampling, ignore_eos=True, adapter=adapter)


def _alone(merged, request, options):
    """The reference: the request alone on an engine over the merged model (no LoRA slots)."""
    import dataclasses

    engine = Engine(merged[options.adapter], max_slots=1)
    try:
        return engine.generate([dataclasses.replace(request)], dataclasses.replace(options, adapter=None))[0]
    finally:
        engine.close()


def _mixed_run(engine, jobs, arrivals, on_step=None):
    """Submit jobs[i] at decode step arrivals[i] (0 = before the first step); returns the Generations."""
    tickets = [None] * len(jobs)
    by_step: dict[int, list[int]] = {}
    for i, step in enumerate(arrivals):
        by_step.setdefault(step, []).append(i)

    def submit(i):
        req, opts = jobs[i]
        tickets[i] = engine.submit(req, opts)

    def step_hook(k):
        for i in by_step.get(k, []):
            submit(i)
        if on_step is not None:
            on_step(k)

    engine.scheduler.on_step = step_hook
    for i in by_step.get(0, []):
        submit(i)
    # the carrier (a long request, submitted first) keeps the batch decoding past the last arrival
    deadline = time.monotonic() + 300
    out = []
    for i in range(len(tickets)):
        while tickets[i] is None:
            assert time.monotonic() < deadline, f"job {i} was never submitted"
            time.sleep(0.01)
        out.append(tickets[i].result(timeout=300))
    engine.scheduler.on_step = None
    return out


def _jobs(model, n, names, seed):
    rng = random.Random(seed)
    reqs = _requests(model, n, seed)
    jobs = [(r, _options(i, names[i % len(names)])) for i, r in enumerate(reqs)]
    carrier = GenerationOptions(max_new_tokens=30, ignore_eos=True)
    jobs.insert(0, (_requests(model, 1, seed + 7)[0], carrier))
    arrivals = [0] + [0 if i < 3 else rng.randint(1, 20) for i in range(n)]
    return jobs, arrivals


def _assert_equal_alone(merged, jobs, got):
    for (req, opts), gen in zip(jobs, got):
        ref = _alone(merged, req, opts)
        assert gen.tokens == ref.tokens, (opts.adapter, opts.sampling)
        torch.testing.assert_close(torch.tensor(gen.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0,
                                   msg=lambda m: f"{opts.adapter}, {opts.sampling}: {m}")


@pytest.mark.parametrize("max_loras", [4, 2])
def test_mixed_batch_equals_each_request_alone_on_its_merged_model(setup, one_thread, max_loras):
    """max_loras=2 < 4 adapters: requests wait for a device slot, slots are evicted and rewritten."""
    base_dir, paths, model, merged = setup
    model = copy.deepcopy(model)  # LoRA slots are installed on this copy
    engine = Engine(model, adapter_reader=read_adapter, max_slots=6, max_loras=max_loras, max_lora_rank=8)
    for name, path in paths.items():
        engine.load_adapter(name, path)
    names = [None, "dec4", "dec8", "tower2", "both6"]
    jobs, arrivals = _jobs(model, 20, names, seed=max_loras)
    got = _mixed_run(engine, jobs, arrivals)
    _assert_equal_alone(merged, jobs, got)
    stats = engine.adapters.stats()
    assert stats["requests"] == {n: 4 for n in names[1:]}
    assert engine.scheduler.image_cache.hits > 0  # base / decoder-only requests share image features
    assert all(a.live == 0 and a.refs == 0 for a in engine.adapters.adapters.values())
    engine.close()


def test_adapters_change_the_answer(setup):
    """The test above would pass vacuously if adapters did nothing: each one changes the logits."""
    _, _, model, merged = setup
    req = _requests(model, 1)[0]
    base = _alone(merged, req, GenerationOptions(max_new_tokens=3, ignore_eos=True))
    for name in ADAPTERS:
        lp = _alone(merged, req, GenerationOptions(max_new_tokens=3, ignore_eos=True, adapter=name)).logprobs
        assert max(abs(a - b) for a, b in zip(lp, base.logprobs)) > 1e-3, name


def test_load_and_unload_under_load_change_no_other_answer(setup, one_thread, tmp_path):
    base_dir, paths, model, merged = setup
    model = copy.deepcopy(model)  # LoRA slots are installed on this copy
    engine = Engine(model, adapter_reader=read_adapter, max_slots=6, max_loras=3, max_lora_rank=8)
    for name in ("dec4", "tower2"):
        engine.load_adapter(name, paths[name])
    events = []

    def on_step(k):
        if k == 3:  # requests of dec4 are in flight: they finish on it; new ones are refused
            engine.unload_adapter("dec4")
            events.append("unloaded")
            req, opts = _jobs(model, 1, ["dec4"], 0)[0][1]
            with pytest.raises(UnknownAdapter, match="loaded adapters: tower2"):
                engine.submit(req, opts)
        if k == 5:
            engine.load_adapter("both6", paths["both6"])
            events.append("loaded")

    names = ["dec4", None, "tower2", "dec4", None, "tower2"]
    jobs, arrivals = _jobs(model, 12, names, seed=5)
    arrivals = [0] + [0 if jobs[i + 1][1].adapter == "dec4" else a for i, a in enumerate(arrivals[1:])]
    got = _mixed_run(engine, jobs, arrivals, on_step)
    assert events == ["unloaded", "loaded"]
    _assert_equal_alone(merged, jobs, got)
    assert engine.adapter_names() == ["both6", "tower2"]
    late = engine.generate([_requests(model, 1)[0]], _options(0, "both6"))[0]  # the new load serves
    assert late.tokens == _alone(merged, _requests(model, 1)[0], _options(0, "both6")).tokens
    engine.close()


def test_bad_adapters_get_clear_errors_and_the_engine_keeps_serving(setup, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    base_dir, paths, model, merged = setup
    model = copy.deepcopy(model)  # LoRA slots are installed on this copy
    engine = Engine(model, adapter_reader=read_adapter, max_slots=2, max_loras=2, max_lora_rank=4)
    with pytest.raises(AdapterError, match=r"rank 8.*max-lora-rank"):
        engine.load_adapter("big", paths["dec8"])
    # another base model: lora_A of one module has the wrong input width
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((paths["dec4"] / "adapter_config.json").read_text())
    tensors = load_file(paths["dec4"] / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(4, 99)
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"language_model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        engine.load_adapter("wrong", wrong)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="cannot read it"):
        engine.load_adapter("corrupt", corrupt)
    engine.load_adapter("dec4", paths["dec4"])
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("dec4", paths["dec4"])
    with pytest.raises(UnknownAdapter, match=r"unknown adapter 'nope'; loaded adapters: dec4"):
        engine.generate(_requests(model, 1), GenerationOptions(adapter="nope"))
    with pytest.raises(ValueError, match="beam search"):
        engine.generate(_requests(model, 1), GenerationOptions(adapter="dec4", num_beams=2))
    req = _requests(model, 1)[0]
    opts = GenerationOptions(max_new_tokens=4, ignore_eos=True, adapter="dec4")
    assert engine.generate([req], opts)[0].tokens == _alone(merged, req, opts).tokens
    # precomputed image features skip the tower: refused for a tower adapter, fine for a decoder-only one
    engine.load_adapter("tower2", paths["tower2"])
    with torch.no_grad():
        feats = model.embed_images(req.pixel_values[None])[0]  # [N, H] through the base tower
    pre = Request(req.text_ids, image_features=feats)
    with pytest.raises(ValueError, match=r"adapter 'tower2' changes the vision tower.*pixel_values"):
        engine.submit(pre, GenerationOptions(max_new_tokens=4, adapter="tower2"))
    assert engine.generate([pre], opts)[0].tokens == _alone(merged, req, opts).tokens
    engine.close()


@pytest.mark.slow
def test_compiled_step_equals_eager_and_a_load_does_not_recompile(setup, one_thread):
    from torch._dynamo.utils import counters

    base_dir, paths, model, merged = setup
    model = copy.deepcopy(model)
    torch._dynamo.reset()
    engine = Engine(model, adapter_reader=read_adapter, max_slots=4, max_loras=2, max_lora_rank=8, compile=True)
    engine.load_adapter("dec4", paths["dec4"])
    reqs = _requests(model, 4)
    opts = [GenerationOptions(max_new_tokens=6, ignore_eos=True, adapter=a) for a in ("dec4", None, "dec4", None)]

    def run():
        tickets = [engine.submit(r, o) for r, o in zip(reqs, opts)]
        return [t.result(timeout=600) for t in tickets]

    first = run()
    for k in (1, 2, 3):  # every rows bucket the scheduler may pick (timing decides): compiled before the count
        [t.result(timeout=600) for t in [engine.submit(r, o) for r, o in zip(reqs[:k], opts[:k])]]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    engine.unload_adapter("dec4")
    engine.load_adapter("dec4", paths["both6"])  # other weights, other rank, other modules (tower too)
    engine.load_adapter("tower2", paths["tower2"])
    opts = [GenerationOptions(max_new_tokens=6, ignore_eos=True, adapter=a) for a in ("dec4", None, "tower2", None)]
    second = run()
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation after the loads
    for r, o, got in zip(reqs, opts, second):
        want = "both6" if o.adapter == "dec4" else o.adapter
        ref = _alone(merged, r, GenerationOptions(max_new_tokens=6, ignore_eos=True, adapter=want))
        assert got.tokens == ref.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    assert first[1].tokens == second[1].tokens  # the base rows did not move
    engine.close()


@pytest.mark.slow
def test_lora_bench_runs_the_three_ways_and_multi_lora_answers_equal_the_merged_ones(one_thread):
    from palikit.bench.lora import format_lora_report, run_lora_bench
    from palikit.bench.serve import load_pg

    pg = load_pg("tiny-pg2", "cpu", "float32")
    rep = run_lora_bench(pg, n_adapters=3, n_requests=24, rate=200.0, slots=4,
                         max_new_tokens={"short": 4, "caption": 6, "long": 8})
    assert rep["agree_multi_swap"] == 24  # every multi-LoRA answer equals its merged-adapter answer
    assert rep["swap_merged"]["swaps"] >= 3 and rep["multi_lora"]["requests"] == rep["base"]["requests"] == 24
    assert rep["multi_vs_base"] == pytest.approx(rep["multi_lora"]["req_per_s"] / rep["base"]["req_per_s"])
    assert rep["multi_vs_base_tokens"] == pytest.approx(rep["multi_lora"]["tokens_per_s"] / rep["base"]["tokens_per_s"])
    assert "swap merged adapters per batch" in format_lora_report(rep)


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base_matches_the_unmerged_delta_path(setup, one_thread, bits):
    """An int8 / int4 base (`model.quant`): a request on a LoRA slot gives the tokens of the existing
    single-adapter path on a quantized model (`merge_adapter` keeps the adapter as an unmerged
    `LoRADelta` there), up to a near tie (`_same_greedy_answer`). Log-probs agree to 3e-2, not 1e-4: the quantized base is that sensitive by
    itself (activations rounded to bf16 / int8 per row: a 5e-7 change of a layer's input moves its
    output by 5e-4; the same base model batched vs alone differs by ~8e-3 with no adapter at all)."""
    from palikit.model.quant import plan, quantize_model

    base_dir, paths, model, merged = setup
    qmodel = quantize_model(copy.deepcopy(model), plan(model, bits))
    refs = {None: qmodel}
    for name in ("dec8", "both6"):
        refs[name] = merge_adapter(copy.deepcopy(qmodel), paths[name])
    lora_model = copy.deepcopy(qmodel)
    engine = Engine(lora_model, adapter_reader=read_adapter, max_slots=4, max_loras=2, max_lora_rank=8)
    for name in ("dec8", "both6"):
        engine.load_adapter(name, paths[name])
    moved = 0.0
    for i, req in enumerate(_requests(lora_model, 6, seed=11)):
        opts = GenerationOptions(max_new_tokens=8, ignore_eos=True, adapter=[None, "dec8", "both6"][i % 3])
        got, ref = engine.generate([req], opts)[0], _alone(refs, req, opts)
        _same_greedy_answer(got, ref, refs[opts.adapter], req, 3e-2)
        if opts.adapter is not None:
            plain = _alone(refs, req, GenerationOptions(max_new_tokens=8, ignore_eos=True))
            moved = max(moved, *(abs(a - b) for a, b in zip(got.logprobs, plain.logprobs)))
    assert moved > 0.1  # the adapters change the answer far beyond that tolerance
    engine.close()


def _margins(model, request, tokens) -> list[float]:
    """The reference's top-1 minus top-2 log-prob before each of its greedy `tokens` (teacher forced)."""
    with torch.inference_mode():
        feats = model.embed_images(request.pixel_values)  # [1, N, H]
        prompt = model.config.prompt_row(request.text_ids, feats.shape[1])
        ids = torch.tensor([prompt + tokens[:-1]])
        ar = torch.tensor([[0] * len(prompt) + [1] * (len(tokens) - 1)])
        logp = model(ids, image_features=feats, ar_mask=ar)[0, len(prompt) - 1:].float().log_softmax(-1)
    top2 = logp.topk(2, dim=-1).values  # [n, 2]
    return (top2[:, 0] - top2[:, 1]).tolist()


def _same_greedy_answer(got, ref, ref_model, request, tol) -> float:
    """Tokens equal, log-probs within `tol`, up to the first step where the reference's own top two
    are within 2 * tol of each other (a near tie the quantized kernels' rounding may break either way:
    the answers may part there, and nothing after it is compared). Returns the largest log-prob gap."""
    margins = _margins(ref_model, request, ref.tokens)
    worst = 0.0
    for i, (a, b) in enumerate(zip(got.tokens, ref.tokens)):
        if a != b:
            assert margins[i] < 2 * tol, f"token {i}: {a} != {b} with a top-2 margin of {margins[i]:.4f}"
            break
        worst = max(worst, abs(got.logprobs[i] - ref.logprobs[i]))
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_a_quantized_base_matches_the_dequantized_base_with_the_adapter_merged(setup, one_thread, bits):
    """Issue 34 on an int8 / int4 base: a request on an adapter in a device slot gives the tokens of
    the float model holding the quantized base's dequantized weights with that adapter merged (the
    plain merge path), log-probs within what the quantized kernels' activation rounding moves
    (int8 per token / bf16), far below what the adapter itself moves."""
    from palikit.model.quant import dequantize_model, plan, quantize_model

    base_dir, paths, model, merged = setup
    qmodel = quantize_model(copy.deepcopy(model), plan(model, bits))
    dequantized = dequantize_model(copy.deepcopy(qmodel))
    refs = {None: dequantized, **{name: merge_adapter(copy.deepcopy(dequantized), paths[name]) for name in ("dec8", "both6")}}
    engine = Engine(qmodel, adapter_reader=read_adapter, max_slots=4, max_loras=2, max_lora_rank=8)
    try:
        for name in ("dec8", "both6"):
            engine.load_adapter(name, paths[name])
        worst, moved = 0.0, 0.0
        for i, req in enumerate(_requests(qmodel, 6, seed=12)):
            opts = GenerationOptions(max_new_tokens=8, ignore_eos=True, adapter=[None, "dec8", "both6"][i % 3])
            got, ref = engine.generate([req], opts)[0], _alone(refs, req, opts)
            worst = max(worst, _same_greedy_answer(got, ref, refs[opts.adapter], req, 3e-2))
            if opts.adapter is not None:
                plain = _alone(refs, req, GenerationOptions(max_new_tokens=8, ignore_eos=True))
                moved = max(moved, *(abs(a - b) for a, b in zip(ref.logprobs, plain.logprobs)))
    finally:
        engine.close()
    assert moved > 10 * worst, (worst, moved)  # the adapters move the answer far beyond the kernels' rounding

