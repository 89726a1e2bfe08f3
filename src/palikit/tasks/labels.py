"""Label lists and English number forms: the one rule for turning what a user typed into class names.

Owns:
- `split_labels`: the label rule every edge uses (API, CLI, HTTP JSON and forms, Ray rows, eval).
  A list/tuple is taken as is (one label per item). A string is a JSON list when it starts with "["
  (what a form field can carry: '["cat","dog"]'), else it is split on ";" ("cat ; dog"), or on ","
  when it has no ";" ("cat, dog"). Blank pieces are dropped. `limit` caps the count.
- `clean_labels`: `split_labels` + the checks a PaliGemma prompt needs (`label_problem`: no newline, no ';'
  or '<'/'>' inside a label; none blank, at least one); whitespace is collapsed. Raises ValueError saying
  what to fix.
- `requested_labels`: the lenient form for the labels a caller says it asked for (the parser's
  "requested" flag): pieces no prompt could hold are dropped, never raises; None = no preference.
- `Labels`: what both return, a list the rule already ran on: `clean_labels` / `requested_labels` take
  one back as is, so labels are cleaned once on their way from the edge through the prompt builder,
  `PaliGemma` and the parser (not re-split, not re-checked).
- `singular` / `plural` and `label_forms` (the spellings a label may come back in: "dog", "dogs").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

__all__ = ["Labels", "split_labels", "clean_labels", "requested_labels", "label_problem", "singular", "plural", "label_forms", "normalize_label"]


class Labels(list):
    """A label list the label rule and the prompt's checks already ran on (`clean_labels`,
    `requested_labels`): each a non-blank string with single spaces and no ';', '<', '>' or newline.
    Treat it as read-only; those functions hand it back as is."""


def split_labels(value: str | Sequence[str] | None, limit: int | None = None) -> list[str]:
    """The label rule (module docstring). Never validates the labels themselves (see `clean_labels`)."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except (json.JSONDecodeError, RecursionError):
                raise ValueError("labels look like a JSON list but are not valid JSON; send e.g. "
                                 '["cat","dog"] or "cat ; dog"') from None
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise ValueError('labels as JSON must be a list of strings, e.g. ["cat","dog"]')
            out = [x.strip() for x in parsed]
        else:
            sep = ";" if ";" in s else ","
            out = [p.strip() for p in s.split(sep) if p.strip()] or [value]
    elif isinstance(value, Sequence):
        out = list(value)
    else:
        raise ValueError(f"labels must be a string or a list of strings, got {type(value).__name__}")
    if limit is not None and len(out) > limit:
        raise ValueError(f"{len(out)} labels; at most {limit} per request")
    return out


def label_problem(item) -> str | None:
    """What keeps `item` from being a label in a PaliGemma prompt (None: nothing); blank is not checked."""
    if not isinstance(item, str):
        return f"label {item!r} is not a string"
    if "\n" in item or "\r" in item:
        return f"label {item!r} contains a newline; '\\n' ends the PaliGemma prompt"
    if ";" in item:
        return f"label {item!r} contains ';', which separates labels; pass labels as a list"
    if "<" in item or ">" in item:
        return f"label {item!r} contains '<' or '>', which mark special tokens such as <loc0000>"
    return None


def clean_labels(value: str | Sequence[str], limit: int | None = None) -> Labels:
    """`split_labels` then the prompt's checks; whitespace inside a label collapsed. A `Labels` comes
    back as is (its count still checked against `limit`)."""
    if isinstance(value, Labels):
        if limit is not None and len(value) > limit:
            raise ValueError(f"{len(value)} labels; at most {limit} per request")
        return value
    items = split_labels(value, limit)
    if not items:
        raise ValueError("no labels given: detect/segment need at least one object name, e.g. detect('dog')")
    out = []
    for item in items:
        problem = label_problem(item)
        if problem:
            raise ValueError(problem)
        label = " ".join(item.split())
        if not label:
            raise ValueError(f"blank label in {list(items)!r}")
        out.append(label)
    return Labels(out)


def requested_labels(value: str | Sequence[str] | None) -> Labels | None:
    """The labels a caller asked for, leniently (never raises): the label rule, then pieces no prompt
    could hold (`label_problem`, blank) dropped and whitespace collapsed; None when nothing is left or
    the value is unreadable ("no preference"). A `Labels` comes back as is."""
    if value is None or isinstance(value, Labels):
        return value or None
    try:
        items = split_labels(value)
    except ValueError:
        return None
    out = [" ".join(x.split()) for x in map(str, items) if x.strip() and not label_problem(x)]
    return Labels(out) if out else None


def normalize_label(label: str) -> str:
    """Lower case, single spaces: how labels are compared."""
    return " ".join(str(label).lower().split())


def singular(word: str) -> str:
    """Crude English singular of the last word ("dogs" -> "dog", "boxes" -> "box", "glass" stays)."""
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if len(low) > 3 and low.endswith("ies"):
        last = last[:-3] + "y"
    elif len(low) > 3 and re.search(r"(?:ch|sh|x|ss|z)es$", low):
        last = last[:-2]
    elif len(low) > 2 and low.endswith("s") and not low.endswith(("ss", "us", "is")):
        last = last[:-1]
    return f"{head} {last}" if head else last


def plural(word: str) -> str:
    """Crude English plural of the last word ("dog" -> "dogs", "box" -> "boxes", "bus" -> "buses")."""
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        last = last[:-1] + "ies"
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        last = last + "es"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last


def label_forms(label: str) -> set[str]:
    """Normalised spellings that count as the same label: itself, its singular, +s, +es."""
    n = normalize_label(label)
    return {n, singular(n), n + "s", n + "es"} if n else set()
