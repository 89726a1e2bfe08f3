"""Beam search (big_vision decodes COCO captions with 2 beams, TextCaps with 3).

Each request gets `num_beams` cache rows; every step keeps the best `num_beams` live continuations
among `2 * num_beams` candidates, reorders the cache rows to follow them, and retires hypotheses that
end in EOS with score `sum(logprob) / length ** length_penalty`. A request is done when it holds
`num_beams` finished hypotheses (or the token budget runs out; live beams then count as finished).

`BeamSearch` is a stepwise job: `step()` runs the prefill the first time, then one decode step, and
says when it is done. The scheduler runs a few of them between its own decode steps (`Scheduler.
submit_job`), so a beam request takes one bounded step at a time, interleaved with every other
request, and a cancelled or timed-out one stops at the next step. `beam_search` runs one to the end.
"""

from __future__ import annotations

import time

import torch

from .features import encode_requests
from .request import Generation, GenerationOptions, Request


class BeamSearch:
    """One beam-search job over `requests` (its own SlotBatch of len(requests) * num_beams rows).
    Use it on the engine thread only. `result` is the list of Generations once `step()` said done
    (`single`: the one request's Generation)."""

    def __init__(self, engine, requests: list[Request], options: GenerationOptions, single: bool = False):
        if single and len(requests) != 1:
            raise ValueError("single=True takes one request")
        self.engine, self.requests, self.options, self.single = engine, requests, options, single
        self.result: list[Generation] | None = None
        self.batch = None
        self.steps = 0

    @property
    def rows(self) -> int:
        return len(self.requests) * self.options.num_beams

    def step(self) -> bool:
        """The prefill (first call) or one decode step; True when every request is done."""
        with torch.inference_mode():
            if self.batch is None:
                self._prefill()
            else:
                self._logits = self.batch.decode_logits()
            done = self._advance()
            if done:
                out = self._results()
                self.result = out[0] if self.single else out
                self.batch = self._logits = None  # the cache goes now, not when the job is collected
            return done

    def _prefill(self) -> None:
        engine, K = self.engine, self.options.num_beams
        B = len(self.requests)
        encode_requests(engine.model, self.requests, engine.scheduler.image_cache)
        self.t0 = time.perf_counter()  # after the tower: prefill_ms must not tell a cached image (scheduler._timings)
        rows = [r for r in self.requests for _ in range(K)]
        P = max(len(r.text_ids) + (0 if r.image_features is None else r.image_features.shape[0]) for r in rows)
        self.batch = engine.new_batch(B * K, P + self.options.max_new_tokens)
        self._logits = self.batch.prefill(list(range(B * K)), rows)
        self.t_first = time.perf_counter()
        self.scores = torch.full((B, K), float("-inf"), device=engine.device)
        self.scores[:, 0] = 0.0  # only one live beam at the start: no duplicate hypotheses
        self.hyps: list[list[tuple[list[int], list[float]]]] = [[([], []) for _ in range(K)] for _ in range(B)]
        self.finished: list[list[tuple[float, list[int], list[float], bool]]] = [[] for _ in range(B)]
        self.done = [False] * B

    def _advance(self) -> bool:
        """Choose the next beams from the last logits; True when the job is over."""
        engine, options, K = self.engine, self.options, self.options.num_beams
        B, dev = len(self.requests), engine.device
        eos = set(engine.eos_ids)
        self.steps += 1
        logprobs = torch.log_softmax(self._logits.float(), dim=-1)  # [B*K, V]
        V = logprobs.shape[-1]
        cand = (self.scores.view(B * K, 1) + logprobs).view(B, K * V)
        top_scores, top_idx = torch.topk(cand, 2 * K, dim=-1)
        top_scores, top_idx = top_scores.cpu().tolist(), top_idx.cpu().tolist()
        lp_cpu = logprobs.view(B, K, V)
        next_rows, next_tokens, next_scores = [], [], []
        new_hyps = []
        for b in range(B):
            row_hyps = []
            for s, idx in zip(top_scores[b], top_idx[b]):
                beam, tok = divmod(idx, V)
                if s == float("-inf"):
                    continue
                tokens, lps = self.hyps[b][beam]
                tok_lp = float(lp_cpu[b, beam, tok])
                if tok in eos:
                    if not self.done[b] and len(self.finished[b]) < K:
                        length = max(len(tokens) + 1, 1)
                        self.finished[b].append((s / length**options.length_penalty, tokens, lps, True))
                    continue
                if len(row_hyps) < K:
                    row_hyps.append((b * K + beam, tok, s, (tokens + [tok], lps + [tok_lp])))
                if len(row_hyps) == K:
                    break
            while len(row_hyps) < K:  # pad with dead beams
                row_hyps.append((b * K, engine.pad_id, float("-inf"), ([], [])))
            if len(self.finished[b]) >= K:
                self.done[b] = True
            for row, tok, s, h in row_hyps:
                next_rows.append(row)
                next_tokens.append(tok)
                next_scores.append(s if not self.done[b] else float("-inf"))
            new_hyps.append([h for *_, h in row_hyps])
        self.hyps = new_hyps
        self.scores = torch.tensor(next_scores, device=dev).view(B, K)
        if all(self.done) or self.steps == options.max_new_tokens:
            return True
        self.batch.reorder(torch.tensor(next_rows, device=dev))
        self.batch.set_tokens(list(range(B * K)), torch.tensor(next_tokens, device=dev))
        return False

    def _results(self) -> list[Generation]:
        t_end, opts = time.perf_counter(), self.options
        timings = {"prefill_ms": (self.t_first - self.t0) * 1e3, "decode_ms": (t_end - self.t_first) * 1e3,
                   "decode_step_ms": (t_end - self.t_first) * 1e3 / max(self.steps, 1)}
        out = []
        for b in range(len(self.requests)):
            pool = list(self.finished[b])
            if not self.done[b]:  # budget exhausted: live beams compete too
                alive = self.scores[b].tolist()
                for k, (tokens, lps) in enumerate(self.hyps[b]):
                    if tokens and alive[k] != float("-inf"):
                        pool.append((sum(lps) / len(tokens) ** opts.length_penalty, tokens, lps, False))
            if not pool:
                out.append(Generation([], [], False, dict(timings)))
                continue
            _, tokens, lps, fin = max(pool, key=lambda x: x[0])
            out.append(Generation(list(tokens), list(lps), fin, dict(timings)))
        return out


def beam_search(engine, requests: list[Request], options: GenerationOptions) -> list[Generation]:
    """Run one job to the end, on the engine thread (or on a model no scheduler runs)."""
    job = BeamSearch(engine, requests, options)
    while not job.step():
        pass
    return job.result  # (a list: single=False)
