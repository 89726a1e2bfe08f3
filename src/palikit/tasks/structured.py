"""Structured outputs: a JSON schema, any JSON object, a regex or a closed list of choices compiled
against a palikit tokenizer, and the per-request token constraint the engine applies while decoding.

The grammar library is xgrammar (optional: `pip install 'palikit[structured]'`), chosen over llguidance
by per-token overhead measured on palikit tokenizers (`python -m palikit.bench.grammar`; README,
"Structured outputs"). `Grammars(tokenizer, vocab)` holds the tokenizer view (built once: the pieces as
a byte-fallback vocabulary; special, `<loc>`, `<seg>` and `<image>` tokens are never allowed, EOS is
the stop token) and an LRU of compiled grammars. `Grammars.compile(spec)` checks a `StructuredSpec` and
refuses, with a ValueError that names the problem, an invalid JSON schema or regex, or a grammar whose
first token this tokenizer cannot write (the bundled demo model's tokenizer has no `{`, for example).
`GrammarConstraint` is one generation's state; it implements the engine's constraint interface
(`allowed()` -> bool mask [V], `advance(token)`, `is_done()`: see the engine's constraints module):
a fresh one per request.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Grammars", "GrammarConstraint", "StructuredSpec", "bitmask_to_bool", "structured_available"]

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_SPEC_CHARS = 64_000
_CONTROL_BYTE = re.compile(r"<0x[01][0-9A-Fa-f]>")
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(frozen=True)
class StructuredSpec:
    """What the output must be: `kind` in KINDS, `value` its argument (a JSON schema dict, a regex
    string, a list of choices, None for any JSON object)."""

    kind: str
    value: Any = None

    def key(self) -> str:
        return json.dumps([self.kind, self.value], sort_keys=True, ensure_ascii=False)


def structured_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def bitmask_to_bool(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """An int32 token bitmask [ceil(V'/32)] (bit i of word w = token 32w+i) -> bool [vocab]."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab]
    return torch.from_numpy(bits.view(np.bool_))


class Grammars:
    """Grammar compilation for one tokenizer; thread-safe; `vocab` = the model's output vocabulary."""

    def __init__(self, tokenizer, vocab: int, cache_size: int = 64):
        try:
            import xgrammar as xgr
        except ImportError:
            raise ValueError("structured outputs need the xgrammar package: pip install 'palikit[structured]'") from None
        self.xgr, self.vocab, self.full = xgr, vocab, tokenizer.vocab_size
        info = xgr.TokenizerInfo(text_pieces(tokenizer, vocab), xgr.VocabType.BYTE_FALLBACK, vocab_size=self.full,
                                 stop_token_ids=[tokenizer.eos_id], add_prefix_space=False)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec):
        """The compiled grammar of `spec` (cached), or ValueError naming what is wrong with it."""
        key = spec.key()
        if len(key) > MAX_SPEC_CHARS:
            raise ValueError(f"the {spec.kind} is {len(key)} characters; at most {MAX_SPEC_CHARS} are accepted")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        first = GrammarConstraint(self, compiled).allowed()
        if not bool(first.any()):
            raise ValueError(f"this model's tokenizer cannot write the first character of any output the {spec.kind} "
                             "allows (its vocabulary lacks it, e.g. '{' or '\"'); use a model whose tokenizer can")
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, spec: StructuredSpec) -> GrammarConstraint:
        """A fresh constraint for one generation."""
        return GrammarConstraint(self, self.compile(spec))

    def _compile(self, spec: StructuredSpec):
        c, kind, value = self.compiler, spec.kind, spec.value
        try:
            if kind == "json_schema":
                check_json_schema(value)
                return c.compile_json_schema(json.dumps(value), any_whitespace=False, strict_mode=True)
            if kind == "json_object":  # OpenAI's JSON mode: one object, any keys
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                if not isinstance(value, str) or not value:
                    raise ValueError("the regex must be a non-empty string")
                return c.compile_regex(value)
            if kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(_ebnf_string(x) for x in check_choice_list(value)))
        except RuntimeError as e:  # xgrammar's parse errors
            raise ValueError(f"invalid {kind.replace('_', ' ')}: {clean_error(e)}") from None
        raise ValueError(f"unknown structured output kind {kind!r}; one of {', '.join(KINDS)}")


class GrammarConstraint:
    """One generation's grammar state (the engine's constraint interface)."""

    def __init__(self, grammars: Grammars, compiled):
        self.vocab = grammars.vocab
        self.matcher = grammars.xgr.GrammarMatcher(compiled)
        self.bitmask = torch.zeros((grammars.full + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar allows next (EOS once the output is complete)."""
        self.matcher.fill_next_token_bitmask(self.bitmask[None])
        return bitmask_to_bool(self.bitmask, self.vocab)

    def advance(self, token_id: int) -> None:
        if not self.matcher.accept_token(int(token_id)):
            raise ValueError(f"token {token_id} does not continue the structured output")

    def is_done(self) -> bool:
        return self.matcher.is_terminated()


def text_pieces(tokenizer, vocab: int) -> list[str]:
    """The tokenizer's pieces (SentencePiece form: "▁" for a space, `<0xNN>` bytes) as a grammar library's
    byte-fallback vocabulary; "" (never allowed) for special, `<loc>`, `<seg>`, `<image>` and ids >= vocab."""
    skip = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id, tokenizer.eos_id, *tokenizer.loc_ids,
            *tokenizer.seg_ids}
    if tokenizer.image_id is not None:
        skip.add(tokenizer.image_id)
    pieces = ["" if i in skip or i >= vocab else tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    # control-character bytes (<0x00>..<0x1F>): xgrammar's JSON strings would take them, JSON forbids them raw
    return ["" if _CONTROL_BYTE.fullmatch(p) else p for p in pieces]


def check_json_schema(schema: Any) -> None:
    """A JSON schema must be an object; with the `jsonschema` package, also a valid schema (its own check)."""
    if isinstance(schema, bool):
        raise ValueError("a JSON schema of true/false says nothing about the output; give a schema object")
    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        from jsonschema import exceptions, validators
    except ImportError:
        return
    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"invalid JSON schema at {where}: {e.message}") from None


def check_choice_list(choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise ValueError("choice must be a non-empty list of strings")
    if len(choices) > 256:
        raise ValueError(f"{len(choices)} choices; at most 256")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("every choice must be a non-empty string")
    return choices


def _ebnf_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # EBNF string literals take JSON's escapes


def clean_error(e: BaseException) -> str:
    """xgrammar's C++ error text without its time stamp and source location, first line only."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return _CPP_PREFIX.sub("", lines[0] if lines else type(e).__name__)[:300]
