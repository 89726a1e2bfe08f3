"""Grammar-library benchmark (how palikit chose the structured-output backend): xgrammar and llguidance
on palikit tokenizers, in one run, on the same grammars and the same token paths.

For each tokenizer (a small PaliGemma-style one with byte fallback, and one filled up to PaliGemma's
257,152 output ids) and each grammar (a JSON schema, a regex), it times: building the library's
tokenizer view once, compiling the grammar, and per generated token what a constraint costs the engine:
the library's next-token bitmask plus advancing its matcher by the token (us/token), and apart from it
the conversion of the bitmask into the bool tensor [V] the engine takes (the same code for both). The token path is the tokenizer's own encoding of a valid answer; both
libraries must allow every token of it (checked), so they walk the same path. Prints a table and one
JSON line. Run: `python -m palikit.bench.grammar` (needs `pip install xgrammar llguidance`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..tasks.structured import bitmask_to_bool, text_pieces
from ..runtime import cpu_model as cpu_name

SCHEMA = {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
    "color": {"type": "string", "maxLength": 12},
    "count": {"type": "integer"},
    "boxes": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    "visible": {"type": "boolean"}},
    "required": ["shape", "color", "count", "boxes", "visible"], "additionalProperties": False}
INSTANCE = {"shape": "circle", "color": "dark red", "count": 3, "boxes": [[12, 40, 99, 120], [0, 7, 33, 64]],
            "visible": True}
REGEX = r"(red|green|blue|yellow) (circle|square|triangle)s?, [0-9]{1,3} px"



def tokenizers(workdir: Path):
    """(name, palikit Tokenizer, output vocab size) for the benchmark's two tokenizers."""
    from ..testing import CHARS, WORDS
    from ..tokenizer import build_tokenizer

    small = build_tokenizer(WORDS + CHARS + list("{}[]_"), workdir / "small", byte_fallback=True)
    words = WORDS + CHARS + list("{}[]_")
    gap = 257_152 - small.vocab_size
    filler = [f"zq{i}" for i in range(gap // 2)]  # each filler word adds 2 ids ("zqN", "▁zqN")
    big = build_tokenizer(words + filler, workdir / "big", byte_fallback=True)
    return [("small", small, small.vocab_size - 1), ("257k", big, big.vocab_size - 1)]


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int):
        import xgrammar as xgr

        self.xgr, self.vocab, self.full = xgr, vocab, tok.vocab_size
        info = xgr.TokenizerInfo(text_pieces(tok, vocab), xgr.VocabType.BYTE_FALLBACK, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id], add_prefix_space=False)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, spec):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
        return self.compiler.compile_regex(spec)

    def matcher(self, compiled):
        return Matcher(self.xgr.GrammarMatcher(compiled), self.full, self.vocab, "fill_next_token_bitmask",
                       "accept_token")


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int):
        import llguidance

        self.ll, self.vocab, self.full = llguidance, vocab, tok.vocab_size
        self.tokenizer = llguidance.LLTokenizer(tok._b.tok.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_id)

    def compile(self, kind: str, spec):
        M = self.ll.LLMatcher
        if kind == "json":
            opts = {**spec, "x-guidance": {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}}
            return M.grammar_from_json_schema(opts)
        return M.grammar_from_regex(spec)

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.tokenizer, compiled)
        if m.is_error():
            raise ValueError(m.get_error())
        return Matcher(m, self.full, self.vocab, None, "consume_token")


class Matcher:
    """One generation's matcher: `step(token)` = the bool mask [V] (as the engine takes it), the token
    checked against it, the matcher advanced; returns the seconds it took."""

    def __init__(self, m, full: int, vocab: int, fill: str | None, accept: str):
        self.m, self.vocab, self.accept = m, vocab, getattr(m, accept)
        self.bitmask = torch.zeros(1, (full + 31) // 32, dtype=torch.int32)
        if fill is not None:
            self.fill = lambda: getattr(m, fill)(self.bitmask)
        else:
            from llguidance.torch import fill_next_token_bitmask

            self.fill = lambda: fill_next_token_bitmask(m, self.bitmask)

    def step(self, token: int) -> tuple[float, float]:
        """(seconds in the library: mask + advance, seconds turning its bitmask into the bool mask)."""
        t0 = time.perf_counter()
        self.fill()
        t1 = time.perf_counter()
        allowed = bitmask_to_bool(self.bitmask[0], self.vocab)
        ok = bool(allowed[token])
        t2 = time.perf_counter()
        self.accept(token)
        t3 = time.perf_counter()
        if not ok:
            raise AssertionError(f"token {token} of the reference path is not allowed")
        return (t1 - t0) + (t3 - t2), t2 - t1


def run_one(lib_cls, tok, vocab: int, cases) -> dict:
    t = time.perf_counter()
    lib = lib_cls(tok, vocab)
    out = {"tokenizer_ms": (time.perf_counter() - t) * 1e3}
    for kind, spec, text in cases:
        t = time.perf_counter()
        compiled = lib.compile(kind, spec)
        lib.matcher(compiled)  # llguidance builds its parser here: part of the compile cost
        compile_ms = (time.perf_counter() - t) * 1e3
        path = tok.encode(text) + [tok.eos_id]
        passes = []
        for _ in range(5):  # a fresh matcher each pass; the best pass per token
            m = lib.matcher(compiled)
            passes.append([m.step(i) for i in path])
        lib_s = [min(p[k][0] for p in passes) for k in range(len(path))]
        conv_s = [min(p[k][1] for p in passes) for k in range(len(path))]
        out[kind] = {"compile_ms": compile_ms, "tokens": len(path), "us_per_token": statistics.mean(lib_s) * 1e6,
                     "us_max": max(lib_s) * 1e6, "to_bool_us": statistics.mean(conv_s) * 1e6}
    return out


def main() -> dict:
    torch.set_num_threads(1)
    cases = [("json", SCHEMA, json.dumps(INSTANCE, separators=(",", ":"))), ("regex", REGEX, "blue squares, 117 px")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        toks = tokenizers(Path(d))
        for lib in (XGrammar, LLGuidance):  # warm-up: each library's one-time initialisation is not a cost per grammar
            run_one(lib, toks[0][1], toks[0][2], cases)
        for name, tok, vocab in toks:
            for lib in (XGrammar, LLGuidance):
                rows.append({"tokenizer": name, "vocab": vocab, "library": lib.name, **run_one(lib, tok, vocab, cases)})
    import importlib.metadata as md

    versions = {n: md.version(n) for n in ("xgrammar", "llguidance")}
    print(f"CPU: {cpu_name()}, 1 torch thread; {versions}")
    print("| tokenizer | library | tokenizer view ms | json compile ms | json us/token (max) | regex compile ms | "
          "regex us/token | bitmask -> bool us |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        j, x = r["json"], r["regex"]
        print(f"| {r['tokenizer']} ({r['vocab']:,} ids) | {r['library']} | {r['tokenizer_ms']:.0f} | "
              f"{j['compile_ms']:.1f} | {j['us_per_token']:.0f} ({j['us_max']:.0f}) | {x['compile_ms']:.1f} | "
              f"{x['us_per_token']:.0f} | {j['to_bool_us']:.0f} |")
    summary = {"bench": "grammar", "cpu": cpu_name(), "versions": versions, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
