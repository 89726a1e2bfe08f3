"""Closed-set answers: the choices a caller gives, checked and tokenized once, and the ranking of
their scores.

A choice is scored as the answer the checkpoint would write after the prompt: its tokens as the
suffix of big_vision's layout `[BOS] prefix "\\n" suffix [EOS]` (`Tokenizer.encode_prompt`), so its
`logprob` is log P(choice tokens + EOS | image, prompt). `probability` is the softmax of the logprobs
over the set; the answer is the most probable choice (the first one given, on a tie). The engine
computes the log-probs (`engine/score.py`); this module owns the rules and the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_CHOICES", "ChoiceSet", "ChoiceScore", "check_choices", "choice_ids", "prepare_choices", "rank_choices"]

MAX_CHOICES = 64


@dataclass(frozen=True)
class ChoiceSet:
    """Checked choices and their suffix tokens (+ EOS), tokenized once (`prepare_choices`)."""

    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChoiceScore:
    text: str
    logprob: float  # log P(choice tokens + EOS | image, prompt)
    probability: float  # softmax of the logprobs over the set
    tokens: tuple[int, ...] = ()  # the choice's tokens (EOS excluded)
    token_logprobs: tuple[float, ...] = ()  # per token, EOS included last

    def to_dict(self) -> dict:
        return {"text": self.text, "logprob": self.logprob, "probability": self.probability}


def check_choices(choices, max_choices: int = MAX_CHOICES) -> list[str]:
    """The choices as a list of strings, or ValueError naming what is wrong: none, more than
    `max_choices`, a non-string, an empty one, a repeated one."""
    if isinstance(choices, str):
        raise ValueError("choices must be a list of strings, e.g. ['yes', 'no'], not one string")
    try:
        out = list(choices)
    except TypeError:
        raise ValueError(f"choices must be a list of strings, got {type(choices).__name__}") from None
    if not out:
        raise ValueError("choices is empty: give at least one candidate answer, e.g. ['yes', 'no']")
    if len(out) > max_choices:
        raise ValueError(f"{len(out)} choices; at most {max_choices} are scored per request")
    seen: dict[str, int] = {}
    for i, c in enumerate(out):
        if not isinstance(c, str):
            raise ValueError(f"choice {i} is a {type(c).__name__}, not a string")
        if not c.strip():
            raise ValueError(f"choice {i} is empty: every choice needs some text")
        if c in seen:
            raise ValueError(f"choice {c!r} is given twice (positions {seen[c]} and {i}); give each once")
        seen[c] = i
    return out


def choice_ids(tokenizer, choices: Sequence[str]) -> list[list[int]]:
    """Each choice's suffix tokens + EOS, as the checkpoint writes an answer. ValueError for a choice
    that tokenizes to nothing, or two choices that tokenize alike (they would score alike)."""
    out, seen = [], {}
    for i, c in enumerate(choices):
        ids = tokenizer.encode_prompt("", c).ids  # [BOS] "\n" suffix [EOS]
        suffix = ids[2:]
        if len(suffix) < 2:
            raise ValueError(f"choice {c!r} tokenizes to nothing; give a choice with text the tokenizer can write")
        key = tuple(suffix)
        if key in seen:
            raise ValueError(f"choices {choices[seen[key]]!r} and {c!r} tokenize alike, so they would score alike; "
                             "give each answer once")
        seen[key] = i
        out.append(suffix)
    return out


def prepare_choices(tokenizer, choices, max_choices: int = MAX_CHOICES) -> ChoiceSet:
    """`check_choices` then `choice_ids`: what the engine scores (a ChoiceSet is returned as is)."""
    if isinstance(choices, ChoiceSet):
        return choices
    texts = check_choices(choices, max_choices)
    return ChoiceSet(tuple(texts), tuple(tuple(i) for i in choice_ids(tokenizer, texts)))


def rank_choices(choices: Sequence[str], ids: Sequence[Sequence[int]],
                 token_logprobs: Sequence[Sequence[float]]) -> list[ChoiceScore]:
    """ChoiceScores in the order given: the summed log-probs and their softmax over the set."""
    totals = [math.fsum(lp) for lp in token_logprobs]
    top = max(totals)
    weights = [math.exp(t - top) for t in totals]  # shifted: no overflow, and -inf -> 0
    norm = math.fsum(weights)
    return [ChoiceScore(c, t, w / norm, tuple(i[:-1]), tuple(lp))
            for c, t, w, i, lp in zip(choices, totals, weights, ids, token_logprobs)]


def best(scores: Sequence[ChoiceScore]) -> ChoiceScore:
    """The most probable choice (the first given on a tie)."""
    return max(scores, key=lambda s: s.logprob)
