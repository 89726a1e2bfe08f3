"""Per-row token constraints in the continuous batch (engine/constraints.py): a constrained row
writes only allowed tokens and equals a naive masked recompute; a constraint that always allows the
raw choice changes nothing (tokens and log-probs); constrained rows beside unconstrained greedy and
seeded rows leave theirs token-identical to running them alone; bad constraints fail their own
request only; the compiled step equals eager with constraints."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from helpers.models import requests_for

from palikit.engine import Engine, GenerationOptions, Request, SamplingOptions
from palikit.engine.constraints import ConstraintError

EOS = 1


class RandomSubsets:
    """Allows a seeded random subset of `k` token ids at each step (never EOS unless in `must`),
    plus `must[i]` at step i; records what it allowed and what was written."""

    def __init__(self, vocab: int, k: int, seed: int, must=(), as_mask: bool = False):
        self.rng, self.vocab, self.k, self.must, self.as_mask = random.Random(seed), vocab, k, list(must), as_mask
        self.offered: list[set[int]] = []
        self.written: list[int] = []
        self._draw()

    def _draw(self) -> None:
        ids = set(self.rng.sample(range(3, self.vocab), self.k))
        if len(self.written) < len(self.must):
            ids.add(self.must[len(self.written)])
        self.current = ids

    def allowed(self) -> torch.Tensor:
        self.offered.append(set(self.current))
        ids = torch.tensor(sorted(self.current))
        if not self.as_mask:
            return ids
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[ids] = True
        return mask

    def advance(self, token_id: int) -> None:
        self.written.append(token_id)
        self._draw()


class AllowAll:
    def __init__(self, vocab):
        self.mask = torch.ones(vocab, dtype=torch.bool)

    def allowed(self):
        return self.mask

    def advance(self, token_id):
        pass


def _vocab(model) -> int:
    return model.config.output_vocab_size


@torch.inference_mode()
def masked_naive(model, request: Request, constraint, max_new_tokens: int) -> list[int]:
    """Reference: recompute the whole sequence every step, argmax over the allowed tokens."""
    n_img = request.image_features.shape[0]
    ids = model.config.prompt_row(request.text_ids, n_img)
    ar = [0] * len(ids)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids]), image_features=request.image_features[None], ar_mask=torch.tensor([ar]))[0, -1]
        allowed = constraint.allowed()
        mask = torch.zeros(logits.shape[0], dtype=torch.bool)
        mask[allowed] = True
        nxt = int(logits.masked_fill(~mask, float("-inf")).argmax())
        if nxt == EOS:
            break
        constraint.advance(nxt)
        out.append(nxt)
        ids.append(nxt)
        ar.append(1)
    return out


@pytest.mark.parametrize("as_mask", [False, True])
def test_constrained_greedy_equals_masked_naive_recompute(models, kind, as_mask):
    model = models[kind]
    engine = Engine(model)
    for i, req in enumerate(requests_for(model, n=2)):
        c = RandomSubsets(_vocab(model), 7, seed=i, as_mask=as_mask)
        got = engine.generate([replace(req, constraint=c)], GenerationOptions(max_new_tokens=9))[0]
        assert all(t in allowed for t, allowed in zip(got.tokens, c.offered))
        assert got.tokens == c.written
        assert got.tokens == masked_naive(model, req, RandomSubsets(_vocab(model), 7, seed=i), 9)
    engine.close()


def test_a_constraint_that_allows_the_raw_choice_changes_nothing(models, kind):
    """Valid raw output stays: same tokens, same (the model's own) log-probs, greedy and seeded."""
    model = models[kind]
    engine = Engine(model, max_slots=4)
    for opts in (GenerationOptions(max_new_tokens=12),
                 GenerationOptions(max_new_tokens=12, sampling=SamplingOptions(temperature=1.2, seed=5))):
        for i, req in enumerate(requests_for(model, n=3, seed=3)):
            raw = engine.generate([req], opts)[0]
            must = raw.tokens + ([EOS] if raw.finished else [])
            c = RandomSubsets(_vocab(model), 5, seed=i, must=must)
            got = engine.generate([replace(req, constraint=c)], opts)[0]
            if opts.sampling.greedy:  # greedy: the raw argmax is allowed, so it is chosen
                assert got.tokens == raw.tokens and got.finished == raw.finished
                assert got.logprobs == raw.logprobs
            assert all(t in allowed for t, allowed in zip(got.tokens, c.offered))
    engine.close()


def test_allow_all_is_the_plain_path_greedy_and_seeded(models):
    """The masked step with an all-True mask gives the unmasked step's tokens (sampling path too)."""
    model = models["pg2"]
    reqs = requests_for(model, n=3, seed=1)
    opts = [GenerationOptions(max_new_tokens=10),
            GenerationOptions(max_new_tokens=10, sampling=SamplingOptions(temperature=1.0, seed=3)),
            GenerationOptions(max_new_tokens=10, sampling=SamplingOptions(temperature=0.7, top_p=0.8, top_k=20, seed=4))]
    engine = Engine(model, max_slots=4)
    plain = [engine.submit(r, o).result() for r, o in zip(reqs, opts)]
    tickets = [engine.submit(replace(r, constraint=AllowAll(_vocab(model))), o) for r, o in zip(reqs, opts)]
    for p, t in zip(plain, tickets):
        g = t.result()
        assert g.tokens == p.tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(p.logprobs), atol=1e-5, rtol=0)
    engine.close()


def _mixed_workload(model):
    """Unconstrained greedy / seeded rows and constrained greedy / seeded rows."""
    reqs = requests_for(model, n=8, seed=7, frames=(1, 2))
    greedy = GenerationOptions(max_new_tokens=11)
    seeded = lambda s: GenerationOptions(max_new_tokens=13, sampling=SamplingOptions(temperature=1.1, top_k=50, seed=s))  # noqa: E731
    plan = []
    for i, r in enumerate(reqs):
        opts = greedy if i % 2 == 0 else seeded(i)
        constrained = i % 4 in (1, 2)
        plan.append((r, opts, constrained, i))
    return plan


def _run(engine, model, plan, only=None):
    tickets, cons = [], []
    for r, opts, constrained, i in plan:
        if only is not None and i != only:
            continue
        c = RandomSubsets(_vocab(model), 9, seed=100 + i) if constrained else None
        cons.append(c)
        tickets.append(engine.submit(replace(r, constraint=c), opts))
    return [t.result(timeout=60) for t in tickets], cons


def test_constrained_rows_leave_their_batch_mates_unchanged(models, kind):
    model = models[kind]
    plan = _mixed_workload(model)
    solo_engine = Engine(model, max_slots=1)
    alone = [_run(solo_engine, model, plan, only=i)[0][0] for *_, i in plan]
    solo_engine.close()
    engine = Engine(model, max_slots=8)
    together, cons = _run(engine, model, plan)
    assert engine.scheduler.decode_slot_steps / engine.scheduler.decode_steps > 3  # they shared steps
    for (_, opts, constrained, i), a, g, c in zip(plan, alone, together, cons):
        assert g.tokens == a.tokens, (i, constrained, opts)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)
        if constrained:
            assert all(t in allowed for t, allowed in zip(g.tokens, c.offered))
    # the same unconstrained rows without any constrained batch mate: identical too
    plain = Engine(model, max_slots=8)
    unconstrained = [(r, o, False, i) for r, o, con, i in plan if not con]
    for (_, _, _, i), g in zip(unconstrained, _run(plain, model, unconstrained)[0]):
        assert g.tokens == together[i].tokens
    engine.close()
    plain.close()


def test_a_seeded_row_draws_the_same_stream_beside_constrained_rows(models):
    model = models["pg2"]
    req = requests_for(model, n=1, seed=9)[0]
    opts = GenerationOptions(max_new_tokens=15, sampling=SamplingOptions(temperature=1.4, seed=21))
    solo = Engine(model, max_slots=1).submit(req, opts).result()
    engine = Engine(model, max_slots=6)
    mates = [engine.submit(replace(r, constraint=RandomSubsets(_vocab(model), 4, seed=j)),
                           GenerationOptions(12, sampling=SamplingOptions(temperature=1.0, seed=j)))
             for j, r in enumerate(requests_for(model, n=4, seed=2))]
    same = engine.submit(req, opts)
    assert same.result().tokens == solo.tokens
    assert all(m.result().tokens for m in mates)
    engine.close()


class Exploding(AllowAll):
    def __init__(self, vocab, after):
        super().__init__(vocab)
        self.after = after

    def advance(self, token_id):
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("grammar bug")


class Empty(AllowAll):
    def allowed(self):
        return torch.zeros(0, dtype=torch.int64)


class Finished(AllowAll):
    def is_done(self):
        return True


def test_bad_constraints_fail_their_own_request_only(models):
    model = models["pg1"]
    reqs = requests_for(model, n=4, seed=4)
    opts = GenerationOptions(max_new_tokens=8, ignore_eos=False)
    alone = Engine(model, max_slots=1).generate([reqs[3]], opts)[0].tokens
    engine = Engine(model, max_slots=4)
    exploding = engine.submit(replace(reqs[0], constraint=Exploding(_vocab(model), 2)), opts)
    empty = engine.submit(replace(reqs[1], constraint=Empty(_vocab(model))), opts)
    finished = engine.submit(replace(reqs[2], constraint=Finished(_vocab(model))), opts)
    good = engine.submit(reqs[3], opts)
    with pytest.raises(RuntimeError, match="grammar bug"):
        exploding.result(timeout=30)
    with pytest.raises(ConstraintError, match="allows no next token"):
        empty.result(timeout=30)
    done = finished.result(timeout=30)
    assert done.tokens == [] and done.finished  # only EOS was allowed
    assert good.result(timeout=30).tokens == alone
    with pytest.raises(TypeError, match="allowed"):
        engine.submit(replace(reqs[0], constraint=object()), opts)
    with pytest.raises(ValueError, match="num_beams=1"):
        engine.submit(replace(reqs[0], constraint=AllowAll(_vocab(model))), GenerationOptions(4, num_beams=2))
    assert engine.scheduler.stats()["live_slots"] == 0
    assert bool(engine.scheduler.batch.allowed.all())  # released rows' masks are reset
    engine.close()


@pytest.mark.slow  # torch.compile of the step (masked variants)
def test_compiled_step_equals_eager_with_constraints(models):
    model = models["pg2"]
    plan = _mixed_workload(model)
    eager, _ = _run(Engine(model, max_slots=8), model, plan)
    compiled_engine = Engine(model, max_slots=8, compile=True)
    compiled, _ = _run(compiled_engine, model, plan)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    compiled_engine.close()
