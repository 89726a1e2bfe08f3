"""Token selection for a batch whose rows each carry their own options: greedy, temperature, top-k,
top-p (nucleus) and a seed, all as per-row tensors, on the device and without a host sync.

Randomness is counter-based: the noise of row r at its n-th generated token is a hash of
(seed_r, n, vocabulary index), so a seeded request draws the same numbers whatever else shares the
batch, whichever slot it sits in, and on CPU or GPU alike. Sampling divides the filtered
probabilities by Exponential(1) noise and takes the argmax (the Gumbel-max trick; equivalent to a
multinomial draw). Reported log-probabilities always come from the untempered model distribution.

Temperatures below `GREEDY_BELOW` count as greedy (vLLM's convention): dividing logits by 1e-300
would overflow to inf and make every token equally likely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 (or < 1e-5) = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on values in [0, 2^32) held in int64 (products wrap; masked back)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def exponential_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exponential(1) noise [B, V] from per-row seeds [B] and counters [B] (int64)."""
    row = _hash32(_hash32(seeds & MASK32) ^ (seeds >> 32) & MASK32)
    row = _hash32(row ^ (counters & MASK32))  # [B]
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ _hash32(idx + 0x9E3779B9)[None, :])  # [B, V]
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / 2**24)  # (0, 1), never 0 or 1
    return -torch.log(uniform)


@dataclass
class RowSampling:
    """Per-row sampling parameters as device tensors ([B] each); greedy rows have temperature 0."""

    temperature: torch.Tensor  # float
    top_k: torch.Tensor  # int64; >= vocab size means no top-k
    top_p: torch.Tensor  # float; 1 means no nucleus cut
    seed: torch.Tensor  # int64
    counter: torch.Tensor  # int64: tokens this row has generated so far


def row_sampling(options: list[SamplingOptions], seeds: list[int], vocab: int, device) -> RowSampling:
    """RowSampling for a batch; `seeds` are the rows' effective seeds (drawn by the caller when None)."""
    return RowSampling(
        temperature=torch.tensor([0.0 if o.greedy else o.temperature for o in options], device=device),
        top_k=torch.tensor([min(o.top_k or vocab, vocab) for o in options], device=device, dtype=torch.int64),
        top_p=torch.tensor([1.0 if o.top_p is None else o.top_p for o in options], device=device),
        seed=torch.tensor(seeds, device=device, dtype=torch.int64),
        counter=torch.zeros(len(options), device=device, dtype=torch.int64),
    )


def greedy_tokens(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (argmax tokens [B], their log-probabilities [B]), no sort over the vocabulary.
    `allowed` [B, V] bool: the argmax is taken over allowed tokens only (constraints.py); the
    log-probabilities stay the model's."""
    tokens = (logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))).argmax(dim=-1)
    logprob = (logits.gather(-1, tokens[:, None]) - torch.logsumexp(logits, dim=-1, keepdim=True))[:, 0]
    return tokens, logprob


def sample_rows(logits: torch.Tensor, s: RowSampling, allowed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprob of each chosen token under the model [B]).
    Greedy rows take the argmax; the others sample from their own filtered, tempered distribution.
    `allowed` [B, V] bool: disallowed tokens get -inf before selection (constraints.py)."""
    logits = logits.float()
    V = logits.shape[-1]
    logprobs = torch.log_softmax(logits, dim=-1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    greedy_rows = s.temperature < GREEDY_BELOW
    temp = torch.where(greedy_rows, torch.ones_like(s.temperature), s.temperature)
    sorted_logits, order = torch.sort(logits / temp[:, None], dim=-1, descending=True)  # [B, V]
    probs, keep = _filtered(sorted_logits, s.top_k, s.top_p)
    noise = exponential_noise(s.seed, s.counter, V).gather(-1, order)  # [B, V] in sorted order
    pick = torch.where(keep, probs / noise, torch.zeros_like(probs)).argmax(dim=-1)  # [B] rank
    sampled = order.gather(-1, pick[:, None])[:, 0]
    tokens = torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def _filtered(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """The top-k / nucleus rule on descending logits [B, V] with per-row top_k [B], top_p [B]:
    (probabilities renormalised over the top-k [B, V], which sorted positions are kept [B, V])."""
    rank = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
    keep = rank[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    # drop a token when the mass strictly before it already reaches top_p (the first always stays)
    keep = keep & ((torch.cumsum(probs, dim=-1) - probs) < top_p[:, None])
    keep[:, 0] = True
    return probs, keep
