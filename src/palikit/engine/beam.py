"""Beam search (big_vision decodes COCO captions with 2 beams, TextCaps with 3).

Each request gets `num_beams` cache rows; every step keeps the best `num_beams` live continuations
among `2 * num_beams` candidates, reorders the cache rows to follow them, and retires hypotheses that
end in EOS with score `sum(logprob) / length ** length_penalty`. A request is done when it holds
`num_beams` finished hypotheses (or the token budget runs out; live beams then count as finished).
"""

from __future__ import annotations

import time

import torch

from .features import encode_requests
from .request import Generation, GenerationOptions, Request


@torch.inference_mode()
def beam_search(engine, requests: list[Request], options: GenerationOptions) -> list[Generation]:
    """Runs on the engine thread (`Engine.generate` sends it through `Scheduler.call`)."""
    K, B = options.num_beams, len(requests)
    dev = engine.device
    t0 = time.perf_counter()
    encode_requests(engine.model, requests, engine.scheduler.image_cache)
    rows = [r for r in requests for _ in range(K)]
    P = max(len(r.text_ids) + (0 if r.image_features is None else r.image_features.shape[0]) for r in rows)
    batch = engine.new_batch(B * K, P + options.max_new_tokens)
    logits = batch.prefill(list(range(B * K)), rows)
    t_first = time.perf_counter()
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # only one live beam at the start: no duplicate hypotheses
    hyps: list[list[tuple[list[int], list[float]]]] = [[([], []) for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int], list[float], bool]]] = [[] for _ in range(B)]
    done = [False] * B
    eos = set(engine.eos_ids)
    steps = 0
    for step in range(options.max_new_tokens):
        steps += 1
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B*K, V]
        V = logprobs.shape[-1]
        cand = (scores.view(B * K, 1) + logprobs).view(B, K * V)
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
                tokens, lps = hyps[b][beam]
                tok_lp = float(lp_cpu[b, beam, tok])
                if tok in eos:
                    if not done[b] and len(finished[b]) < K:
                        length = max(len(tokens) + 1, 1)
                        finished[b].append((s / length**options.length_penalty, tokens, lps, True))
                    continue
                if len(row_hyps) < K:
                    row_hyps.append((b * K + beam, tok, s, (tokens + [tok], lps + [tok_lp])))
                if len(row_hyps) == K:
                    break
            while len(row_hyps) < K:  # pad with dead beams
                row_hyps.append((b * K, engine.pad_id, float("-inf"), ([], [])))
            if len(finished[b]) >= K:
                done[b] = True
            for row, tok, s, h in row_hyps:
                next_rows.append(row)
                next_tokens.append(tok)
                next_scores.append(s if not done[b] else float("-inf"))
            new_hyps.append([h for *_, h in row_hyps])
        hyps = new_hyps
        scores = torch.tensor(next_scores, device=dev).view(B, K)
        if all(done) or step + 1 == options.max_new_tokens:
            break
        batch.reorder(torch.tensor(next_rows, device=dev))
        batch.set_tokens(list(range(B * K)), torch.tensor(next_tokens, device=dev))
        logits = batch.decode_logits()
    t_end = time.perf_counter()
    out = []
    timings = {"prefill_ms": (t_first - t0) * 1e3, "decode_ms": (t_end - t_first) * 1e3,
               "decode_step_ms": (t_end - t_first) * 1e3 / max(steps, 1)}
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # budget exhausted: live beams compete too
            alive = scores[b].tolist()
            for k, (tokens, lps) in enumerate(hyps[b]):
                if tokens and alive[k] != float("-inf"):
                    pool.append((sum(lps) / len(tokens) ** options.length_penalty, tokens, lps, False))
        if not pool:
            out.append(Generation([], [], False, dict(timings)))
            continue
        _, tokens, lps, fin = max(pool, key=lambda x: x[0])
        out.append(Generation(list(tokens), list(lps), fin, dict(timings)))
    return out
