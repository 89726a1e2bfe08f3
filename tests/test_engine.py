"""Engine equivalences: fast == naive, batched == single, cached == uncached, palikit == transformers
`generate`, sampling and beam search behaviour."""

from __future__ import annotations

import pytest
import torch

from helpers.models import hf_model, requests_for
from palikit.engine import Engine, GenerationOptions, Request, SamplingOptions, generate_naive
from palikit.engine.sampling import RowSampling, sample_rows
from palikit.engine.slots import SlotBatch


def test_engine_greedy_equals_naive_recompute(models, kind):
    model = models[kind]
    engine = Engine(model)
    for req in requests_for(model):
        fast = engine.generate([req], GenerationOptions(max_new_tokens=10))[0].tokens
        assert fast == generate_naive(model, req, 10)
        assert len(fast) > 2


def test_batched_equals_single(models, kind):
    model = models[kind]
    engine = Engine(model)
    reqs = requests_for(model, n=4, frames=(1, 2, 1, 1))
    reqs.append(Request([2, 11, 12, 13, 7], None))  # text-only row in the same batch
    opts = GenerationOptions(max_new_tokens=9)
    batched = engine.generate(reqs, opts)
    for req, got in zip(reqs, batched):
        single = engine.generate([req], opts)[0]
        assert got.tokens == single.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(single.logprobs), atol=1e-4, rtol=0)


def test_cached_logits_equal_uncached_forward(models, kind):
    """Teacher-forced: prefill + cached decode steps give the full forward's logits, in a slot
    batch whose other rows hold other sequences."""
    model = models[kind]
    engine = Engine(model)
    req, other = requests_for(model, n=2)
    generated = engine.generate([req], GenerationOptions(max_new_tokens=6, ignore_eos=True))[0].tokens
    n_img = req.image_features.shape[0]
    ids = torch.tensor([[model.config.image_token_index] * n_img + req.text_ids + generated])
    ar = torch.tensor([[0] * (n_img + len(req.text_ids)) + [1] * len(generated)])
    with torch.no_grad():
        full = model(ids, image_features=req.image_features[None], ar_mask=ar)[0]
    start = n_img + len(req.text_ids) - 1
    with torch.inference_mode():
        batch = SlotBatch(model, n_slots=3, max_len=64)
        batch.prefill([0], [other])
        got = [batch.prefill([2], [req])[0]]
        for tok in generated[:-1]:
            batch.set_tokens([0, 2], torch.tensor([5, tok]))
            got.append(batch.decode_logits()[2])
    for i, row in enumerate(got):
        torch.testing.assert_close(row, full[start + i].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pad_batch", [False, True])
def test_generation_equals_transformers_generate(models, kind, pad_batch):
    model = models[kind]
    cfg = model.config
    hf = hf_model(kind)
    g = torch.Generator().manual_seed(3)
    S, N = cfg.vision.image_size, cfg.vision.num_image_tokens
    texts = [[2] + torch.randint(3, 300, (n,), generator=g).tolist() + [7] for n in ((3, 6) if pad_batch else (4,))]
    pv = torch.rand(len(texts), 3, S, S, generator=g) * 2 - 1
    T = max(len(t) for t in texts) + N
    ids = torch.zeros(len(texts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, t in enumerate(texts):
        row = [cfg.image_token_index] * N + t
        ids[b, T - len(row):] = torch.tensor(row)
        mask[b, T - len(row):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pv, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                          max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=1)[:, T:]
    feats = model.embed_images(pv).detach()
    ours = Engine(model).generate([Request(t, feats[b]) for b, t in enumerate(texts)], GenerationOptions(max_new_tokens=8))
    for b, gen in enumerate(ours):
        ref = [t for t in out[b].tolist() if t not in (0, 1)]
        ref_full = out[b].tolist()
        assert gen.tokens == ref, (gen.tokens, ref_full)


def test_sampling_is_seeded_and_top_k1_is_greedy(models):
    model = models["pg2"]
    engine = Engine(model)
    req = requests_for(model, n=1)[0]
    sample = lambda seed: engine.generate([req], GenerationOptions(12, SamplingOptions(temperature=1.5, seed=seed)))[0].tokens
    assert sample(1) == sample(1)
    assert any(sample(1) != sample(s) for s in (2, 3, 4))
    greedy = engine.generate([req], GenerationOptions(12))[0].tokens
    top1 = engine.generate([req], GenerationOptions(12, SamplingOptions(temperature=0.7, top_k=1, seed=5)))[0].tokens
    assert top1 == greedy


def test_sampler_matches_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits / 0.8, -1)[0]
    B = 8
    rows = RowSampling(torch.full((B,), 0.8), torch.full((B,), 5), torch.ones(B), torch.arange(B), torch.zeros(B, dtype=torch.long))
    counts = torch.zeros(5)
    for step in range(4000):
        rows.counter.fill_(step)
        tok, lp = sample_rows(logits.expand(B, 5), rows)
        counts += torch.bincount(tok, minlength=5)
    freq = counts / counts.sum()
    assert (freq - probs).abs().max() < 0.015
    # reported logprob is under the untempered model distribution
    torch.testing.assert_close(lp[0], torch.log_softmax(logits, -1)[0, tok[0]])


def test_top_p_and_top_k_filters():
    """Which tokens per-row sampling can ever pick (temperature 1): the nucleus keeps a token while the mass before it
    is below top_p (0.7 -> the first two, 0.4 -> the first), top-k the k most likely."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    B = 64
    for top_k, top_p, allowed in ((4, 0.7, {0, 1}), (4, 0.4, {0}), (3, 1.0, {0, 1, 2})):
        rows = RowSampling(torch.full((B,), 1.0), torch.full((B,), top_k), torch.full((B,), top_p), torch.arange(B),
                           torch.zeros(B, dtype=torch.long))
        picked = set()
        for step in range(30):
            rows.counter.fill_(step)
            picked |= set(sample_rows(logits.expand(B, 4), rows)[0].tolist())
        assert picked == allowed, (top_k, top_p, picked)


def test_beam_search_finds_at_least_the_greedy_score(models, kind):
    """Where it is a theorem, for every request: no EOS (the stop id is `<image>`, which the model never
    emits, so every hypothesis has the budget's length) and two new tokens. Greedy's first token is the
    best, so it is among the beams; the second step's candidates then hold greedy's whole answer, and the
    best beam (length_penalty 0: the sum of log-probs) can only score as high or higher."""
    model = models[kind]
    no_eos = Engine(model, eos_ids=(model.config.image_token_index,))
    for req in requests_for(model, n=3):
        greedy = no_eos.generate([req], GenerationOptions(max_new_tokens=2))[0]
        for k in (2, 4):
            beam = no_eos.generate([req], GenerationOptions(max_new_tokens=2, num_beams=k, length_penalty=0.0))[0]
            assert len(beam.tokens) == len(greedy.tokens) == 2
            assert sum(beam.logprobs) >= sum(greedy.logprobs) - 1e-5, (k, beam.tokens, greedy.tokens)
    no_eos.close()


def test_beam_search_reports_the_models_logprobs(models, kind):
    model = models[kind]
    engine = Engine(model)
    for req in requests_for(model, n=2):
        beam = engine.generate([req], GenerationOptions(max_new_tokens=6, num_beams=4, length_penalty=0.0))[0]
        # the reported per-token logprobs are the model's for that sequence
        n_img = req.image_features.shape[0]
        ids = torch.tensor([[model.config.image_token_index] * n_img + req.text_ids + beam.tokens])
        ar = torch.tensor([[0] * (n_img + len(req.text_ids)) + [1] * len(beam.tokens)])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids, image_features=req.image_features[None], ar_mask=ar)[0].float(), -1)
        start = n_img + len(req.text_ids) - 1
        ref = [float(lp[start + i, t]) for i, t in enumerate(beam.tokens)]
        torch.testing.assert_close(torch.tensor(beam.logprobs), torch.tensor(ref), atol=1e-4, rtol=0)


def test_beam_search_batched_equals_single(models):
    model = models["pg1"]
    engine = Engine(model)
    reqs = requests_for(model, n=3)
    opts = GenerationOptions(max_new_tokens=7, num_beams=3)
    batched = engine.generate(reqs, opts)
    for req, got in zip(reqs, batched):
        assert got.tokens == engine.generate([req], opts)[0].tokens


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(temperature=1, top_p=1.5)
    with pytest.raises(ValueError, match="beam search"):
        GenerationOptions(num_beams=2, sampling=SamplingOptions(temperature=1.0))


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_transformers(models, kind, num_beams):
    model = models[kind]
    cfg = model.config
    hf = hf_model(kind)
    N = cfg.vision.num_image_tokens
    engine = Engine(model)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        text = [2] + torch.randint(3, 300, (4,), generator=g).tolist() + [7]
        pv = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
        ids = torch.tensor([[cfg.image_token_index] * N + text])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                              token_type_ids=torch.zeros_like(ids), max_new_tokens=6, num_beams=num_beams,
                              do_sample=False, early_stopping=True, length_penalty=1.0, pad_token_id=0, eos_token_id=1)
        ref = [t for t in out[0, ids.shape[1]:].tolist() if t not in (0, 1)]
        feats = model.embed_images(pv)[0].detach()
        ours = engine.generate([Request(text, feats)], GenerationOptions(6, num_beams=num_beams))[0]
        assert ours.tokens == ref
