"""Structured outputs' grammar constraint (`tasks/structured.py`) on token sequences: the tokens of a
valid answer are all allowed and end with only EOS; seeded random walks through the allowed tokens
(a stand-in for any model) always end in text that parses and validates against its JSON schema, matches
its regex or equals one of its choices; special, <loc> and <seg> tokens are never allowed; invalid
schemas, regexes and grammars a tokenizer cannot write are refused by name."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from palikit.tasks.structured import Grammars, StructuredSpec, bitmask_to_bool

SCHEMAS = [
    {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}, "n": {"type": "integer"},
                                      "ok": {"type": "boolean"}}, "required": ["shape", "n", "ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "boxes": {"type": "array", "maxItems": 3,
                                                "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                          "items": {"type": "integer", "minimum": 0, "maximum": 99}}}},
     "required": ["name", "boxes"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "enum": ["red", "blue"]}, "minItems": 1, "maxItems": 4},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from palikit.testing import CHARS, WORDS
    from palikit.tokenizer import build_tokenizer

    return build_tokenizer(WORDS + CHARS + list("{}[]"), tmp_path_factory.mktemp("tok"), byte_fallback=True)


@pytest.fixture(scope="module")
def grammars(tok):
    return Grammars(tok, tok.vocab_size - 1)  # <image> (the last id) is outside the output vocabulary


def walk(grammars, tok, spec: StructuredSpec, seed: int, max_steps: int = 400) -> str:
    """Random allowed tokens (EOS taken when allowed, half the time) until EOS: the text written."""
    rng = random.Random(seed)
    c = grammars.constraint(spec)
    out = []
    specials = {tok.pad_id, tok.bos_id, tok.unk_id, *tok.loc_ids, *tok.seg_ids}
    for _ in range(max_steps):
        allowed = c.allowed()
        assert allowed.shape == (grammars.vocab,) and allowed.dtype == torch.bool
        ids = allowed.nonzero().flatten().tolist()
        assert ids and not specials & set(ids)
        if tok.eos_id in ids and (len(ids) == 1 or rng.random() < 0.5):
            return tok.decode(out)
        t = rng.choice([i for i in ids if i != tok.eos_id])
        c.advance(t)
        out.append(t)
    raise AssertionError(f"no EOS after {max_steps} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "nested", "array"])
def test_random_walks_validate_against_their_schema(grammars, tok, schema):
    for seed in range(8):
        text = walk(grammars, tok, StructuredSpec("json_schema", schema), seed)
        jsonschema.validate(json.loads(text), schema)


def test_a_valid_answer_is_allowed_token_by_token_then_only_eos(grammars, tok):
    schema = SCHEMAS[1]
    text = json.dumps({"name": "a cat", "boxes": [[1, 2], [30, 99]]})  # the grammar's separators: ", " and ": "
    c = grammars.constraint(StructuredSpec("json_schema", schema))
    for t in tok.encode(text):
        assert bool(c.allowed()[t]), tok.decode([t])
        c.advance(t)
    assert c.allowed().nonzero().flatten().tolist() == [tok.eos_id]
    bad = grammars.constraint(StructuredSpec("json_schema", schema))
    with pytest.raises(ValueError, match="does not continue"):
        bad.advance(tok.encode("]")[0])


def test_json_object_regex_and_choice(grammars, tok):
    for seed in range(5):
        assert isinstance(json.loads(walk(grammars, tok, StructuredSpec("json_object"), seed, 2000)), dict)
        assert re.fullmatch(r"(red|blue) [0-9]{1,2}", walk(grammars, tok, StructuredSpec("regex", r"(red|blue) [0-9]{1,2}"), seed))
        assert walk(grammars, tok, StructuredSpec("choice", ["a cat", "the dog", "7"]), seed) in ["a cat", "the dog", "7"]


@pytest.mark.parametrize("spec, message", [
    (StructuredSpec("json_schema", {"type": "foo"}), "invalid JSON schema"),
    (StructuredSpec("json_schema", {"type": "object", "properties": {"a": {"minLength": -1}}}),
     "invalid JSON schema at properties/a/minLength"),
    (StructuredSpec("json_schema", "not a schema"), "must be a JSON object"),
    (StructuredSpec("regex", "(ab"), "invalid regex: .*parenthesis is not closed"),
    (StructuredSpec("regex", ""), "non-empty string"),
    (StructuredSpec("choice", []), "non-empty list"),
    (StructuredSpec("grammar", "x"), "unknown structured output kind"),
])
def test_invalid_specs_are_refused_by_name(grammars, spec, message):
    with pytest.raises(ValueError, match=message):
        grammars.compile(spec)


def test_a_grammar_the_tokenizer_cannot_write_is_refused():
    """The bundled demo model's tokenizer has no '{' or '"': JSON is refused up front; a regex it can write works."""
    from palikit.assets import bundled_demo_model
    from palikit.tokenizer import Tokenizer

    tok = Tokenizer.from_file(bundled_demo_model())
    g = Grammars(tok, tok.vocab_size)
    with pytest.raises(ValueError, match="cannot write the first character"):
        g.compile(StructuredSpec("json_object"))
    g.compile(StructuredSpec("regex", "(red|green) [0-9]"))


def test_bitmask_to_bool_reads_bits_little_endian():
    words = torch.tensor([1 - 2**31, 0b110], dtype=torch.int32)  # bits 0 and 31 of word 0
    assert bitmask_to_bool(words, 40).nonzero().flatten().tolist() == [0, 31, 33, 34]
