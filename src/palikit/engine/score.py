"""Closed-set scoring: the log-probability of each of N continuations after one shared prompt, in one
teacher-forced pass over token ids (what `choices=` answers are ranked by).

The prompt ([image][BOS] prefix "\\n") runs once, as one bidirectional prefix, into a one-row cache.
Its keys/values are then copied into an N-row cache and the continuations run as N parallel causal
suffixes in one forward: row i holds continuation i after the shared prefix (positions and attention
blocks exactly as in generation: a suffix token sees the whole prefix and the suffix tokens before it),
so its log-probs equal a full [prefix | continuation] forward with the prefix-LM mask (tested against
transformers). Continuations are grouped so that the copied cache and the logits of one group stay
within `max_bytes`; the prefix is never recomputed.

Runs on the engine thread (`Engine.score` goes through `Scheduler.call`): the model is never entered
by two threads. The request's image features must be ready (`features.encode_requests`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model import CacheWrite, PaliGemmaModel
from ..model.gemma import PAD_BLOCK, positions_and_blocks

DEFAULT_MAX_BYTES = 512 * 2**20  # copied prefix cache + logits of one group of continuations


@torch.inference_mode()
def score_continuations(model: PaliGemmaModel, request, continuations: Sequence[Sequence[int]],
                        max_bytes: int = DEFAULT_MAX_BYTES) -> list[list[float]]:
    """Per continuation, the log-prob of each of its tokens given the prompt and the tokens before it
    (a continuation usually ends with EOS). `request`: an engine `Request` with its image features set."""
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    prefix_kv, first_logprobs, n_prefix, next_position = _prefill(model, request)
    out: list[list[float]] = []
    for group in _groups(model, continuations, n_prefix, max_bytes):
        out += _score_group(model, prefix_kv, first_logprobs, n_prefix, next_position, group)
    return out


def _prefill(model: PaliGemmaModel, request):
    """The prompt into a one-row cache: (cache, log-probs [V] of the first continuation token, prompt
    length in cache slots, RoPE position of the first continuation token)."""
    dev = model.device
    feats = request.image_features
    n_img = 0 if feats is None else feats.shape[0]
    ids = torch.tensor([model.config.prompt_row(request.text_ids, n_img)], device=dev)  # [1, P]
    P = ids.shape[1]
    valid = torch.ones_like(ids, dtype=torch.bool)
    positions, block = positions_and_blocks(valid, None)  # one bidirectional prefix
    cache = model.new_cache(1, P)
    write = CacheWrite(cache, torch.zeros_like(ids), torch.arange(P, device=dev)[None])
    image = None if feats is None else feats.reshape(1, -1, feats.shape[-1]).to(dev, cache.k.dtype)
    h = model.language_model(model.embed_inputs(ids, image), positions, block, write)  # [1, P, H]
    first = torch.log_softmax(model.logits(h[:, -1]).float(), dim=-1)[0]  # [V]
    return cache, first, P, int(positions[0, -1]) + 1


def _groups(model: PaliGemmaModel, continuations, n_prefix: int, max_bytes: int):
    """Consecutive groups whose N-row cache and logits fit `max_bytes` (at least one continuation each)."""
    t = model.config.text
    kv_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * torch.finfo(model.dtype).bits // 8
    vocab = model.config.output_vocab_size
    group: list = []
    for c in continuations:
        trial = group + [c]
        L = max(len(x) for x in trial)
        cost = len(trial) * ((n_prefix + L) * kv_token + L * vocab * 4)
        if group and cost > max_bytes:
            yield group
            trial = [c]
        group = trial
    if group:
        yield group


def _score_group(model: PaliGemmaModel, prefix, first_logprobs, P: int, next_position: int, group) -> list[list[float]]:
    dev = model.device
    n = len(group)
    L = max(len(c) for c in group) - 1  # inputs: every token but the last of each continuation
    out = [[float(first_logprobs[c[0]])] for c in group]
    if L == 0:
        return out
    cache = model.new_cache(n, P + L)
    cache.k[:, :, :, :P].copy_(prefix.k.expand(-1, n, -1, -1, -1))  # [Lyr, n, Hkv, P, D]: the shared prompt
    cache.v[:, :, :, :P].copy_(prefix.v.expand(-1, n, -1, -1, -1))
    cache.block[:, :P].copy_(prefix.block.expand(n, -1))
    ids = torch.full((n, L), model.config.pad_token_id, dtype=torch.long)
    valid = torch.zeros(n, L, dtype=torch.bool)
    for i, c in enumerate(group):
        ids[i, : len(c) - 1] = torch.tensor(list(c[:-1]))
        valid[i, : len(c) - 1] = True
    ids, valid = ids.to(dev), valid.to(dev)
    steps = torch.arange(L, device=dev)
    positions = (next_position + steps)[None].expand(n, L)  # [n, L]
    block = torch.where(valid, (1 + steps).to(torch.int32)[None], PAD_BLOCK)  # causal after the prefix block 0
    rows = torch.arange(n, device=dev)[:, None].expand(n, L)
    write = CacheWrite(cache, rows, (P + steps)[None].expand(n, L), read_len=P + L)
    h = model.language_model(model.language_model.embed(ids), positions, block, write)  # [n, L, H]
    logprobs = torch.log_softmax(model.logits(h).float(), dim=-1)  # [n, L, V]
    for i, c in enumerate(group):
        targets = torch.tensor(list(c[1:]), dtype=torch.long, device=dev)  # token t+1 is predicted at input t
        out[i] += logprobs[i, torch.arange(len(targets), device=dev), targets].tolist()
    return out
