"""Structured outputs on `/v1/chat/completions`: the request fields that ask for them, mapped onto one
`tasks.structured.StructuredSpec`, and the per-request grammar constraint the engine decodes under.

Accepted (at most one per request; anything else is a 400 naming the field):
- OpenAI: `response_format` `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`,
  `{"type": "json_object"}` (one JSON object), `{"type": "text"}` (no constraint).
- vLLM's extra fields: `guided_json` (a schema), `guided_regex`, `guided_choice` (a list of strings), and
  `structured_outputs` `{"json": schema, "regex": str, "choice": [...], "json_object": true}` (one key).
  `grammar` / `structural_tag` are refused by name (not supported).

The output is then exactly the JSON / regex match / choice (the grammar ends it with EOS), unless
`max_tokens` cuts it first (finish_reason "length", as in OpenAI and vLLM). JSON is written compactly
with ", " and ": " separators, properties in the schema's order, no other whitespace. Grammars are
compiled in a worker thread (cached per model); an invalid schema or regex, or one the model's tokenizer
cannot write, is a 400 naming the field.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import anyio

from ..tasks.structured import Grammars, StructuredSpec
from .errors import bad_request

_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pg -> Grammars
_LOCK = threading.Lock()


def chat_spec(req) -> tuple[StructuredSpec, str] | None:
    """(spec, the field that asked for it) of a ChatRequest, or None; a 400 for a malformed or doubled ask."""
    asks = [(name, value) for name, value in (("response_format", _response_format(req.response_format)),
                                             ("guided_json", _kind("json_schema", req.guided_json)),
                                             ("guided_regex", _kind("regex", req.guided_regex)),
                                             ("guided_choice", _kind("choice", req.guided_choice)),
                                             ("structured_outputs", _structured_outputs(req.structured_outputs)))
            if value is not None]
    if len(asks) > 1:
        raise bad_request(f"ask for one structured output at a time, not {' and '.join(n for n, _ in asks)}.",
                          asks[1][0])
    return (asks[0][1], asks[0][0]) if asks else None


def _kind(kind: str, value: Any) -> StructuredSpec | None:
    return None if value is None else StructuredSpec(kind, value)


def _response_format(rf: Any) -> StructuredSpec | None:
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise bad_request("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}.",
                              "response_format")
        return StructuredSpec("json_schema", js["schema"])
    raise bad_request("response_format type must be 'text', 'json_object' or 'json_schema'.", "response_format")


_SO_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "json_object": "json_object"}


def _structured_outputs(so: Any) -> StructuredSpec | None:
    if so is None:
        return None
    if not isinstance(so, dict):
        raise bad_request("structured_outputs must be an object such as {'choice': ['yes', 'no']}.",
                          "structured_outputs")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    unsupported = sorted(set(given) - set(_SO_KINDS))
    if unsupported:
        raise bad_request(f"structured_outputs {', '.join(unsupported)} is not supported here; use json, regex, "
                          "choice or json_object.", "structured_outputs")
    if len(given) != 1:
        raise bad_request("structured_outputs takes exactly one of json, regex, choice, json_object.",
                          "structured_outputs")
    (key, value), = given.items()
    if key == "json_object":
        return StructuredSpec("json_object")
    if key == "json" and isinstance(value, str):  # vLLM also takes the schema as a JSON string
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request("structured_outputs json is a string but not valid JSON.", "structured_outputs") from None
    return StructuredSpec(_SO_KINDS[key], value)


def grammars_for(pg) -> Grammars:
    """The model's grammar compiler (its tokenizer's view is built once, on first use)."""
    with _LOCK:
        g = _GRAMMARS.get(pg)
        if g is None:
            g = _GRAMMARS[pg] = Grammars(pg.tokenizer, pg.model.config.output_vocab_size)
        return g


async def chat_constraint(pg, asked: tuple[StructuredSpec, str] | None):
    """A fresh constraint for one chat completion (compiled in a worker thread), or None; a 400 naming
    the field when the grammar library is missing or the spec is invalid or unwritable."""
    if asked is None:
        return None
    spec, field = asked

    def work():
        return grammars_for(pg).constraint(spec)

    try:
        return await anyio.to_thread.run_sync(work)
    except ValueError as e:
        raise bad_request(f"{field}: {e}.", field) from None
