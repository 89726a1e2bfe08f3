"""Per-row token constraints in the continuous batch: which tokens a row may write next.

The interface (the detect/segment grammar in `tasks/constrain.py` and the chat's grammar backends
implement it; the engine imports none of them):

    class Constraint(Protocol):
        def allowed(self) -> torch.Tensor:
            '''The tokens the row may write next: a bool mask [V'] (True = allowed; V' may be shorter
            than the model's output vocabulary, ids beyond it are not allowed) or a 1-D int64 tensor
            of allowed ids, each in [0, V). At least one token must be allowed. Return a cached tensor when the
            state repeats: the engine copies it and never writes into it.'''
        def advance(self, token_id: int) -> None:
            '''The row wrote `token_id` (every generated token except the stop token that ends it).'''
        def is_done(self) -> bool:            # optional; absent = never done
            '''True: nothing more may be written; the engine then allows only the row's stop ids
            (every token when it has none: ignore_eos).'''

Attach one fresh object per request: `Request(text_ids, ..., constraint=obj)` (it is stateful: one
object per generation, never shared). Calls happen on the engine thread: `allowed()` before each
token of that row (the first from the prefill's logits), `advance(token)` after it. A constraint
that raises, or allows nothing, fails its own request only (the error is its Ticket's).

What the engine guarantees (tests/test_constrained.py):
- The mask applies to the row's logits before selection: greedy, seeded sampling, temperature,
  top-k and top-p all see the masked logits (top-k / top-p rank only allowed tokens).
- Reported log-probabilities stay the model's own (unmasked, untempered): a constrained output
  that equals the raw output has the same tokens and the same log-probs (vLLM's "raw_logprobs").
- A row's constraint never changes another row's tokens or its seeded random stream: masks are
  per row (unconstrained rows' mask rows are all True, so their logits are untouched) and the
  noise of a row depends only on its seed and its own token count.
- A batch without any constrained row runs the unmasked step (nothing to pay). With one, the
  step's compiled graph takes the mask buffer as an input (a static tensor): changing masks never
  recompiles; the masked variant compiles once per shape bucket, like the unmasked one.
- Beam search takes no constraint (a clear error).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class ConstraintError(ValueError):
    """A constraint allowed no token (or returned something the engine cannot read)."""


def check_constraint(constraint: Any) -> None:
    """Refuse an object that is not a constraint (at submit, before it reaches a batch)."""
    for name in ("allowed", "advance"):
        if not callable(getattr(constraint, name, None)):
            raise TypeError(f"a request's constraint needs an {name}() method; got {type(constraint).__name__}")


def fill_mask(out: torch.Tensor, constraint: Any, stop_ids: Iterable[int]) -> None:
    """Write `constraint`'s next allowed tokens into the bool row `out` [V]: its `allowed()`, or
    only `stop_ids` once it `is_done()`. ConstraintError when nothing is allowed."""
    done = getattr(constraint, "is_done", None)
    if done is not None and done():
        stops = [i for i in stop_ids if 0 <= i < out.shape[0]]
        if not stops:  # ignore_eos (benchmarks): nothing is left to constrain
            out.fill_(True)
            return
        out.zero_()
        out[stops] = True
        return
    allowed = constraint.allowed()
    if not isinstance(allowed, torch.Tensor) or allowed.ndim != 1:
        raise ConstraintError(f"a constraint's allowed() must return a 1-D tensor, got {type(allowed).__name__}")
    if allowed.dtype == torch.bool:
        n = min(allowed.shape[0], out.shape[0])
        out[:n].copy_(allowed[:n])
        if n < out.shape[0]:
            out[n:] = False
        empty = not bool(out.any())
    else:  # ids: each in [0, V) (an id outside raises IndexError: the request's error)
        out.zero_()
        out[allowed] = True
        empty = allowed.numel() == 0
    if empty:
        raise ConstraintError("the request's constraint allows no next token (its grammar is exhausted or empty)")


def masks_for(constraints: list[Any], stop_ids: list[Iterable[int]], vocab: int, device) -> torch.Tensor | None:
    """Allowed masks [k, V] for rows with these constraints (None entries: all allowed), or None
    when none is constrained (the prefill's first tokens)."""
    if all(c is None for c in constraints):
        return None
    out = torch.ones(len(constraints), vocab, dtype=torch.bool, device=device)
    for row, (c, stops) in enumerate(zip(constraints, stop_ids)):
        if c is not None:
            fill_mask(out[row], c, stops)
    return out
