"""What a `palikit eval --baseline SPEC` string is made of, below every adapter: the error a spec or
setting that cannot work raises (`BaselineError`, its message says what to change) and the
`?key=value&...` option reader the adapters share (`spec_options`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl


class BaselineError(ValueError):
    """A baseline spec or setting that cannot work; the message says what to change."""


def spec_options(query: str, allowed: Mapping[str, type], spec: str) -> dict[str, Any]:
    """The `k=v&...` part of `spec` as typed keyword arguments; an unknown key or a value of the wrong
    type is a `BaselineError` naming the options there are."""
    out: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in allowed:
            raise BaselineError(f"baseline {spec!r}: unknown option {k!r} (options: {', '.join(allowed)})")
        try:
            out[k] = allowed[k](v)
        except ValueError:
            raise BaselineError(f"baseline {spec!r}: option {k}={v!r} must be a {allowed[k].__name__}") from None
    return out
