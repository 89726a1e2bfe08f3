"""The generation engine: one prefix-LM prefill over image + prompt into a static KV cache, then a
1-token decode step (optionally compiled / CUDA-graphed) until EOS or the token budget.

Batching: rows of different prompt lengths are left-padded so every prompt ends at the same cache
slot; then all rows decode into one shared slot per step and the step has static shapes. Padding
slots carry block `PAD_BLOCK` and are never attended, and positions count real tokens only, so a
batched row gives the same tokens as the same request alone. The engine sees token ids and image
features only; text and images are the task API's job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model import KVCache, PaliGemmaModel
from ..model.gemma import positions_and_blocks
from .sampling import SamplingOptions, select_tokens

DECODE_BLOCK = 2**20  # decode tokens' block base: above any prompt block, below PAD_BLOCK


@dataclass
class Request:
    """One prompt: text ids ([BOS] prefix "\\n" [forced suffix start]) and its image features
    [F*N, H] (None for a text-only prompt)."""

    text_ids: list[int]
    image_features: torch.Tensor | None = None
    ar_mask: list[int] | None = None  # per text token; default: all prefix


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    finished: bool  # True when EOS was produced (not cut by max_new_tokens)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    sampling: SamplingOptions = SamplingOptions()
    num_beams: int = 1
    length_penalty: float = 1.0
    ignore_eos: bool = False  # benchmarks: always run max_new_tokens steps

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and not self.sampling.greedy:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Engine:
    """Batched generation over a PaliGemmaModel with a static cache reused across calls."""

    def __init__(self, model: PaliGemmaModel, eos_ids: tuple[int, ...] | None = None, compile: bool = False):
        self.model = model
        cfg = model.config
        self.eos_ids = tuple(eos_ids) if eos_ids else (cfg.eos_token_id,)
        self.pad_id = cfg.pad_token_id
        self._cache: KVCache | None = None
        self._decode = self._decode_step
        self._greedy = self._greedy_step
        self._cuda_graphs = compile and self.device.type == "cuda"
        if compile:
            # CUDA graphs on GPU ("reduce-overhead"); fused C++ kernels on CPU
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode = torch.compile(self._decode_step, mode=mode, fullgraph=True, dynamic=False)
            self._greedy = torch.compile(self._greedy_step, mode=mode, fullgraph=True, dynamic=False)

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------------------ pieces
    def _cache_for(self, batch: int, length: int) -> KVCache:
        c = self._cache
        if c is None or c.batch_size != batch or c.max_len < length:
            # keep shapes stable across calls (one compiled graph per batch size)
            self._cache = c = self.model.new_cache(batch, _round_up(length, 64))
        c.reset()
        return c

    def _pack(self, requests: list[Request]):
        """Left-pad [pad][image][text] rows to a common length P."""
        img_id = self.model.config.image_token_index
        rows = []
        for r in requests:
            n_img = 0 if r.image_features is None else r.image_features.shape[0]
            ids = [img_id] * n_img + list(r.text_ids)
            ar = [0] * n_img + (list(r.ar_mask) if r.ar_mask is not None else [0] * len(r.text_ids))
            rows.append((ids, ar))
        P = max(len(ids) for ids, _ in rows)
        B = len(rows)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        ar = torch.zeros(B, P, dtype=torch.int32)
        valid = torch.zeros(B, P, dtype=torch.bool)
        for b, (row_ids, row_ar) in enumerate(rows):
            n = len(row_ids)
            ids[b, P - n:] = torch.tensor(row_ids)
            ar[b, P - n:] = torch.tensor(row_ar, dtype=torch.int32)
            valid[b, P - n:] = True
        dev = self.device
        return ids.to(dev), ar.to(dev), valid.to(dev)

    def _prefill(self, requests: list[Request], cache: KVCache):
        ids, ar, valid = self._pack(requests)
        feats = [r.image_features for r in requests if r.image_features is not None]
        image_features = None
        if feats:
            image_features = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])[None].to(self.device, self.dtype)
        positions, block = positions_and_blocks(valid, ar)
        logits = self.model(
            ids, image_features=image_features, positions=positions, block=block, cache=cache,
            cache_position=torch.arange(ids.shape[1], device=self.device), logits_to_keep=1,
        )[:, -1]  # [B, V]
        return logits, positions[:, -1], ids.shape[1]

    def _decode_step(self, tokens, positions, cache_position, cache: KVCache):
        """tokens [B], positions [B], cache_position [1] -> logits [B, V]."""
        lm = self.model.language_model
        x = lm.embed(tokens[:, None])
        block = (cache_position + DECODE_BLOCK).to(torch.int32).expand(tokens.shape[0], 1)
        h = lm(x, positions[:, None], block, cache, cache_position)
        return self.model.logits(h)[:, -1]

    def _greedy_step(self, tokens, positions, cache_position, cache: KVCache, finished, eos):
        """One whole greedy step, fused (and compiled as one graph when asked):
        decode -> argmax -> logprob -> mask finished rows -> advance positions."""
        logits = self._decode_step(tokens, positions, cache_position, cache).float()
        nxt = logits.argmax(dim=-1)
        logprob = (logits.gather(-1, nxt[:, None]) - torch.logsumexp(logits, dim=-1, keepdim=True))[:, 0]
        nxt = nxt.masked_fill(finished, self.pad_id)
        return nxt, logprob, finished | torch.isin(nxt, eos), positions + 1, cache_position + 1

    # ------------------------------------------------------------------------------ API
    @torch.inference_mode()
    def stream(self, requests: list[Request], options: GenerationOptions = GenerationOptions()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens [B], logprobs [B]) per step; rows that finished yield the pad id."""
        if options.num_beams > 1:
            raise ValueError("streaming supports greedy and sampling, not beam search")
        opts = options.sampling
        gen = None
        if opts.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(opts.seed)
        B = len(requests)
        P = max(len(r.text_ids) + (0 if r.image_features is None else r.image_features.shape[0]) for r in requests)
        cache = self._cache_for(B, P + options.max_new_tokens)
        logits, last_pos, P = self._prefill(requests, cache)
        eos = torch.tensor(self.eos_ids if not options.ignore_eos else (-1,), device=self.device)
        check_every = 8 if self.device.type == "cuda" else 4  # all-finished check: a host sync each time
        graphs = self._cuda_graphs
        cache_position = torch.tensor([P], device=self.device)
        positions = last_pos + 1
        tokens, logprobs = select_tokens(logits, opts, gen)
        finished = torch.isin(tokens, eos)
        for step in range(options.max_new_tokens):
            yield tokens, logprobs
            if step + 1 == options.max_new_tokens:
                return
            if (step + 1) % check_every == 0 and bool(finished.all()):
                return
            if opts.greedy:
                out = self._greedy(tokens, positions, cache_position, cache, finished, eos)
                if graphs:  # CUDA-graph outputs are overwritten by the next replay
                    out = tuple(t.clone() for t in out)
                tokens, logprobs, finished, positions, cache_position = out
            else:
                logits = self._decode(tokens, positions, cache_position, cache)
                logits = logits.clone() if graphs else logits
                tokens, logprobs = select_tokens(logits, opts, gen)
                tokens = tokens.masked_fill(finished, self.pad_id)
                finished = finished | torch.isin(tokens, eos)
                positions, cache_position = positions + 1, cache_position + 1

    def generate(self, requests: list[Request], options: GenerationOptions = GenerationOptions()) -> list[Generation]:
        if not requests:
            return []
        if options.num_beams > 1:
            from .beam import beam_search

            return beam_search(self, requests, options)
        t0 = time.perf_counter()
        steps = []
        t_first = None
        for tokens, logprobs in self.stream(requests, options):
            steps.append((tokens, logprobs.float()))
            if t_first is None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # honest prefill timing
                t_first = time.perf_counter()
        if steps:
            toks = torch.stack([t for t, _ in steps], 1).cpu()  # [B, steps], one host copy
            lps = torch.stack([lp for _, lp in steps], 1).cpu()
        t_end = time.perf_counter()
        return self._collect(toks, lps, len(requests), t0, t_first, t_end, options.ignore_eos)

    def _collect(self, toks, lps, B, t0, t_first, t_end, ignore_eos=False) -> list[Generation]:
        out = []
        n_decode = max(toks.shape[1] - 1, 1)
        timings = {
            "prefill_ms": (t_first - t0) * 1e3,
            "decode_ms": (t_end - t_first) * 1e3,
            "decode_step_ms": (t_end - t_first) * 1e3 / n_decode,
        }
        eos = () if ignore_eos else self.eos_ids
        for b in range(B):
            row, row_lp, finished = [], [], False
            for t, lp in zip(toks[b].tolist(), lps[b].tolist()):
                if t in eos:
                    finished = True
                    break
                row.append(t)
                row_lp.append(lp)
            out.append(Generation(row, row_lp, finished, dict(timings)))
        return out


@torch.inference_mode()
def generate_naive(model: PaliGemmaModel, request: Request, max_new_tokens: int, eos_ids=(1,)) -> list[int]:
    """Reference greedy decoding: recompute the whole sequence every step, no cache."""
    img = model.config.image_token_index
    n_img = 0 if request.image_features is None else request.image_features.shape[0]
    ids = [img] * n_img + list(request.text_ids)
    ar = [0] * len(ids)
    feats = None if request.image_features is None else request.image_features[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        t = torch.tensor([ids])
        logits = model(t, image_features=feats, ar_mask=torch.tensor([ar]))[0, -1]
        nxt = int(logits.argmax())
        if nxt in eos_ids:
            break
        out.append(nxt)
        ids.append(nxt)
        ar.append(1)
    return out
