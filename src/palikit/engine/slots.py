"""The decode batch of the continuous-batching engine: a static KV cache with a fixed number of rows
("slots"), each holding one sequence with its own write position, RoPE position and sampling state.

- `prefill(rows, requests)` runs new prompts (right-padded, one batched forward over their own
  tokens) and stores their keys/values into the given rows; the rest of the batch is untouched.
- `step()` decodes one token for every slot at once: each row writes at its own slot index and
  attends to the first `read_len` cache slots, a power-of-two length bucket, over the first `rows`
  slots, a power-of-two slot-count bucket that holds every live row (new sequences take the lowest
  free row, so few live requests decode few rows). Shapes are static per (rows, read_len) bucket
  pair, so the step compiles once per pair (CUDA graphs on GPU). Free rows inside the bucket
  compute too but never advance and are never read.
- `decode_logits()` / `reorder()` are the pieces beam search builds on.
- `allowed` [S, V] bool holds each row's token mask (all True unless a constraint set it with
  `set_allowed`; reset at release); `step(sample, masked=True)` applies it (constraints.py).

Positions count real tokens only and padding carries `PAD_BLOCK`, so a sequence gives the same
tokens whatever shares the batch (tested against the same request alone).
"""

from __future__ import annotations

import torch

from ..model import CacheWrite, PaliGemmaModel
from ..model.gemma import positions_and_blocks
from ..model.lora import lora_rows
from .constraints import fill_mask
from .sampling import RowSampling, greedy_tokens, sample_rows

DECODE_BLOCK = 2**20  # decode tokens' block base: above any prompt block, below PAD_BLOCK
MIN_BUCKET = 64


def length_bucket(n: int, smallest: int = MIN_BUCKET) -> int:
    """The smallest power-of-two multiple of `smallest` that is >= n."""
    b = smallest
    while b < n:
        b *= 2
    return b


class SlotBatch:
    """`n_slots` sequences decoding together over one static cache of `max_len` slots per row."""

    def __init__(self, model: PaliGemmaModel, n_slots: int, max_len: int, compile: bool = False):
        self.model = model
        self.n_slots = n_slots
        self.device = model.device
        self.vocab = model.config.output_vocab_size
        self.cache = model.new_cache(n_slots, length_bucket(max_len))
        z = lambda dtype=torch.int64: torch.zeros(n_slots, dtype=dtype, device=self.device)  # noqa: E731
        self.tokens = z()  # next input token of each row
        self.positions = z()  # its RoPE position
        self.write = z()  # the cache slot it writes
        self.live = z(torch.bool)
        self.adapter = z()  # each row's LoRA slot (0 = base model; `model.lora`)
        self.sampling = RowSampling(z(torch.float32), torch.full_like(z(), self.vocab), torch.ones_like(z(torch.float32)),
                                    z(), z())
        self.allowed = torch.ones(n_slots, self.vocab, dtype=torch.bool, device=self.device)  # constraints.py
        self.host_write = [0] * n_slots  # host mirrors of `write` and `live` (no device sync per step)
        self.host_live = [False] * n_slots
        self._rows = torch.arange(n_slots, device=self.device)[:, None]  # [S, 1]
        self._graphs = compile and self.device.type == "cuda"
        self._greedy_step, self._sample_step, self._decode = self._greedy_impl, self._sample_impl, self._decode_impl
        if compile:
            # CUDA graphs on GPU ("reduce-overhead"); fused C++ kernels on CPU. One graph per
            # (slot bucket, length bucket) pair: allow that many recompiles of these two functions.
            import torch._dynamo.config as dynamo_config

            pairs = (n_slots.bit_length() + 1) * 10
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, pairs)
            mode = "reduce-overhead" if self._graphs else None
            for t in (self.tokens, self.positions, self.write, self.live, self.allowed, *vars(self.sampling).values()):
                torch._dynamo.mark_static_address(t)
            opts = dict(mode=mode, fullgraph=True, dynamic=False)
            self._greedy_step = torch.compile(self._greedy_impl, **opts)
            self._sample_step = torch.compile(self._sample_impl, **opts)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def grow(self, max_len: int) -> None:
        """Reallocate the cache to hold `max_len` slots per row, keeping what is written."""
        old = self.cache
        self.cache = self.model.new_cache(self.n_slots, length_bucket(max_len))
        n = old.max_len
        self.cache.k[:, :, :, :n].copy_(old.k)
        self.cache.v[:, :, :, :n].copy_(old.v)
        self.cache.block[:, :n].copy_(old.block)

    # ------------------------------------------------------------------------------ prefill
    def _pack(self, requests):
        """Right-padded [image][text] rows: ids, autoregressive flags, validity [k, P] on the device,
        and each row's length (a host list)."""
        rows = []
        for r in requests:
            n_img = 0 if r.image_features is None else r.image_features.shape[0]
            ar = [0] * (n_img + len(r.text_ids))  # the whole prompt is one bidirectional prefix
            rows.append((self.model.config.prompt_row(r.text_ids, n_img), ar))
        P, k = max(len(ids) for ids, _ in rows), len(rows)
        ids = torch.full((k, P), self.model.config.pad_token_id, dtype=torch.long)
        ar = torch.zeros(k, P, dtype=torch.int32)
        valid = torch.zeros(k, P, dtype=torch.bool)
        for b, (row_ids, row_ar) in enumerate(rows):
            ids[b, : len(row_ids)] = torch.tensor(row_ids)
            ar[b, : len(row_ar)] = torch.tensor(row_ar, dtype=torch.int32)
            valid[b, : len(row_ids)] = True
        dev = self.device
        return ids.to(dev), ar.to(dev), valid.to(dev), [len(r) for r, _ in rows]

    def prefill(self, rows: list[int], requests) -> torch.Tensor:
        """Run `requests` into cache `rows` (any previous content is dropped); logits [k, V] (fp32)
        at each prompt's last token. The rows' next input token is set with `set_tokens`."""
        ids, ar, valid, host_lengths = self._pack(requests)
        k, P = ids.shape  # P = max(host_lengths)
        if P > self.max_len:
            self.grow(P)
        lengths = torch.tensor(host_lengths, device=self.device)
        feats = [r.image_features.reshape(-1, r.image_features.shape[-1]) for r in requests if r.image_features is not None]
        image_features = torch.cat(feats)[None].to(self.device, self.cache.k.dtype) if feats else None
        row_t = torch.tensor(rows, device=self.device)
        self.cache.reset(row_t)
        positions, block = positions_and_blocks(valid, ar)
        write = CacheWrite(self.cache, row_t[:, None].expand(k, P), torch.arange(P, device=self.device)[None].expand(k, P))
        x = self.model.embed_inputs(ids, image_features)
        slots = [r.lora_slot for r in requests]
        with lora_rows(self.model, slots):
            h = self.model.language_model(x, positions, block, write)  # [k, P, H]
        last = lengths - 1
        logits = self.model.logits(h[torch.arange(k, device=self.device), last]).float()  # [k, V]
        self.positions[row_t] = positions[torch.arange(k, device=self.device), last] + 1
        self.write[row_t] = lengths
        self.live[row_t] = True
        self.adapter[row_t] = torch.tensor(slots, device=self.device)
        for r, n in zip(rows, host_lengths):
            self.host_write[r], self.host_live[r] = n, True
        return logits

    def set_tokens(self, rows: list[int], tokens: torch.Tensor) -> None:
        self.tokens[torch.tensor(rows, device=self.device)] = tokens.to(self.device)

    def set_sampling(self, rows: list[int], s: RowSampling) -> None:
        """Per-row sampling state for `rows` (counter = tokens already generated)."""
        r = torch.tensor(rows, device=self.device)
        for name in ("temperature", "top_k", "top_p", "seed", "counter"):
            getattr(self.sampling, name)[r] = getattr(s, name).to(self.device)

    def set_allowed(self, row: int, constraint, stop_ids) -> None:
        """The row's token mask for its next step, from its constraint (constraints.fill_mask)."""
        fill_mask(self.allowed[row], constraint, stop_ids)

    def release(self, rows: list[int]) -> None:
        """Free rows: they stop advancing and what they wrote is never attended again."""
        r = torch.tensor(rows, device=self.device)
        self.allowed[r] = True
        self.live[r] = False
        self.write[r] = 0
        self.adapter[r] = 0
        self.cache.reset(r)
        for row in rows:
            self.host_write[row], self.host_live[row] = 0, False

    # ------------------------------------------------------------------------------ decode
    def _decode_impl(self, tokens, positions, write, cache, read_len: int):
        """tokens/positions/write [n] over cache rows [0, n) -> logits [n, V] (fp32); writes each
        row's k/v at its slot."""
        lm = self.model.language_model
        x = lm.embed(tokens[:, None])  # [n, 1, H]
        block = (write + DECODE_BLOCK).to(torch.int32)[:, None]  # [n, 1]: causal over decode tokens
        rows = self._rows[: tokens.shape[0]]  # [n, 1]
        h = lm(x, positions[:, None], block, CacheWrite(cache, rows, write[:, None], read_len))
        return self.model.logits(h)[:, -1].float()

    # The compiled steps take the whole persistent state (static addresses, so CUDA graphs may
    # capture its in-place updates) and slice the first `n` rows inside the graph.
    def _greedy_impl(self, tokens, positions, write, live, cache, read_len: int, n: int, allowed=None):
        logits = self._decode_impl(tokens[:n], positions[:n], write[:n], cache, read_len)
        nxt, logprob = greedy_tokens(logits, None if allowed is None else allowed[:n])
        step = live[:n].long()
        tokens[:n].copy_(nxt)
        positions[:n].add_(step)
        write[:n].add_(step)
        return nxt, logprob

    def _sample_impl(self, tokens, positions, write, live, cache, temperature, top_k, top_p, seed, counter,
                     read_len: int, n: int, allowed=None):
        logits = self._decode_impl(tokens[:n], positions[:n], write[:n], cache, read_len)
        rows = RowSampling(temperature[:n], top_k[:n], top_p[:n], seed[:n], counter[:n])
        nxt, logprob = sample_rows(logits, rows, None if allowed is None else allowed[:n])
        step = live[:n].long()
        tokens[:n].copy_(nxt)
        positions[:n].add_(step)
        write[:n].add_(step)
        counter[:n].add_(step)
        return nxt, logprob

    def _read_len(self) -> int:
        need = max((w for w, on in zip(self.host_write, self.host_live) if on), default=0) + 1
        if need > self.max_len:
            self.grow(need)
        return min(length_bucket(need), self.max_len)

    def _rows_bucket(self) -> int:
        """Power-of-two slot count holding every live row."""
        top = max((r for r, on in enumerate(self.host_live) if on), default=0) + 1
        return min(length_bucket(top, 1), self.n_slots)

    def step(self, sample: bool, masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for the slots of the current bucket (live rows advance). sample=False:
        all rows greedy; masked=True: each row selects among its `allowed` tokens. Returns (tokens
        [n], logprobs [n]) on the device, n = the slot bucket (> every live row); free rows' values
        are meaningless."""
        read_len, n = self._read_len(), self._rows_bucket()
        state = (self.tokens, self.positions, self.write, self.live, self.cache)
        allowed = self.allowed if masked else None
        with lora_rows(self.model, self.adapter):
            if sample:
                sm = self.sampling
                nxt, lp = self._sample_step(*state, sm.temperature, sm.top_k, sm.top_p, sm.seed, sm.counter, read_len,
                                            n, allowed)
            else:
                nxt, lp = self._greedy_step(*state, read_len, n, allowed)
        if self._graphs:  # CUDA-graph outputs are overwritten by the next replay
            nxt, lp = nxt.clone(), lp.clone()
        self._advance_host()
        return nxt, lp

    def _advance_host(self) -> None:
        for r, on in enumerate(self.host_live):
            self.host_write[r] += on

    def decode_logits(self) -> torch.Tensor:
        """Beam search's step: logits [S, V] for every row's next token; live rows advance."""
        with lora_rows(self.model, self.adapter):
            logits = self._decode(self.tokens, self.positions, self.write, self.cache, self._read_len())
        step = self.live.long()
        self.positions += step
        self.write += step
        self._advance_host()
        return logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i takes the state of row rows[i] (beam search follows its best continuations)."""
        self.cache.select_rows(rows)
        for t in (self.tokens, self.positions, self.write, self.live, self.adapter):
            t.copy_(t.index_select(0, rows))
        order = rows.tolist()
        self.host_write = [self.host_write[r] for r in order]
        self.host_live = [self.host_live[r] for r in order]
