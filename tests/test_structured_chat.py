"""Structured outputs on `/v1/chat/completions` (in-process app, httpx ASGI transport): response_format
json_schema / json_object and vLLM's guided_json / guided_regex / guided_choice / structured_outputs
constrain the decoder, so a random tiny model (tokenizer with JSON characters) and the trained demo model
answer inside the format: JSON that parses and validates against its schema, a regex match, one of the
choices. Invalid asks are a 400 naming the field. A structured row beside plain rows in the continuous
batch leaves their tokens and log-probs identical to the same requests alone."""

from __future__ import annotations

import asyncio
import io
import json
import re

import httpx
import jsonschema
import pytest
from PIL import Image
from serve_helpers import data_url, png_bytes

from palikit.api import PaliGemma
from palikit.assets import bundled_demo_model
from palikit.serve import ServerSettings, create_app
from palikit.serve.structured import grammars_for
from palikit.tasks.structured import StructuredSpec
from palikit.testing import make_tiny_checkpoint

SCHEMAS = [
    {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 20},
                                      "visible": {"type": "boolean"}},
     "required": ["shape", "count", "visible"], "additionalProperties": False},
    {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8},
                                      "box": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                         "maximum": 1023},
                                              "minItems": 4, "maxItems": 4}},
     "required": ["label", "box"]},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("json") / "ckpt", family="pg2", seed=5, extra_chars="{}[]")
    return PaliGemma.from_pretrained(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def demo():
    return PaliGemma.from_pretrained(bundled_demo_model(), device="cpu", dtype="float32")


def _body(prompt: str = "answer en what is this", image: int = 0, **kw) -> dict:
    return {"max_tokens": 120, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(40, 30, seed=image))}},
        {"type": "text", "text": prompt}]}], **kw}


def _chat(pg, bodies: list[dict]) -> list[httpx.Response]:
    async def main():
        app = create_app(pg, ServerSettings(warmup=False))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    return asyncio.run(main())


def _content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


def test_json_schema_outputs_validate(tiny, one_thread):
    bodies = [_body(image=i, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}})
              for i, s in enumerate(SCHEMAS)]
    bodies += [_body(image=7, guided_json=SCHEMAS[0]), _body(image=8, structured_outputs={"json": json.dumps(SCHEMAS[1])})]
    schemas = SCHEMAS + [SCHEMAS[0], SCHEMAS[1]]
    for r, schema in zip(_chat(tiny, bodies), schemas):
        jsonschema.validate(json.loads(_content(r)), schema)


def test_json_object_regex_and_choices(tiny, one_thread):
    choices = ["a red circle", "two squares", "none"]
    # JSON mode leaves the keys and values free: a random model's greedy text loops until max_tokens (a
    # valid prefix, cut: "length"); seeded sampling (reproducible, independent of batch mates) ends it
    bodies = [_body(image=0, response_format={"type": "json_object"}, max_tokens=300, temperature=1.0, seed=0),
              _body(image=2, guided_regex=r"(red|blue) [0-9]{1,3}"),
              _body(image=3, guided_choice=choices),
              _body(image=4, structured_outputs={"regex": "[a-z]{2,5}!"}),
              _body(image=5, structured_outputs={"choice": choices}),
              _body(image=6, response_format={"type": "text"}, max_tokens=5),
              _body("detect cat ; dog", image=7, guided_choice=choices)]  # the caller's grammar, not detect's
    r = _chat(tiny, bodies)
    obj = json.loads(_content(r[0]))
    assert isinstance(obj, dict) and obj
    assert re.fullmatch(r"(red|blue) [0-9]{1,3}", _content(r[1]))
    assert _content(r[2]) in choices and _content(r[4]) in choices
    assert re.fullmatch(r"[a-z]{2,5}!", _content(r[3]))
    assert r[5].status_code == 200
    assert _content(r[6]) in choices


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "'schema'"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be 'text', 'json_object' or 'json_schema'"),
    ({"guided_regex": "(ab"}, "guided_regex", "invalid regex: "),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured output at a time"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "structured_outputs", "grammar is not supported"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
])
def test_invalid_structured_asks_are_a_400_naming_the_field(tiny, extra, param, message):
    r, = _chat(tiny, [_body(**extra)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_demo_model_answers_inside_the_choices_and_refuses_json(demo, one_thread):
    from palikit.demo.shapes import make_sample

    colours = ["red", "green", "blue", "yellow"]
    sample = make_sample(3, seed=11)
    buf = io.BytesIO()
    sample.image.save(buf, "PNG")
    shape = sample.shapes[0]
    body = _body(f"answer en what color is the {shape.cls}", guided_choice=colours)
    body["messages"][0]["content"][0]["image_url"]["url"] = data_url(buf.getvalue())
    regex = _body("caption en", guided_regex=r"(a|an|one|two|three) [a-z]+( [a-z]+)*")
    r = _chat(demo, [body, regex, _body(response_format={"type": "json_object"})])
    assert _content(r[0]) in colours
    assert re.fullmatch(r"(a|an|one|two|three) [a-z]+( [a-z]+)*", _content(r[1]))
    assert r[2].status_code == 400 and "cannot write" in r[2].json()["error"]["message"]


def test_a_structured_row_leaves_its_batch_mates_unchanged(tiny, one_thread):
    """Plain requests decoded beside a grammar-constrained one give the tokens and log-probs they give alone."""
    images = [Image.open(io.BytesIO(png_bytes(30 + i, 30, seed=20 + i))) for i in range(4)]
    prompts = ["caption en", "answer en what is this", "describe en", "detect cat"]
    alone = [tiny.predict(im, p, max_new_tokens=20) for im, p in zip(images, prompts)]
    spec = StructuredSpec("json_schema", SCHEMAS[0])
    pending = [tiny.submit(images[0], "answer en what", max_new_tokens=60,
                           constraint=grammars_for(tiny).constraint(spec))]
    pending += [tiny.submit(im, p, max_new_tokens=20) for im, p in zip(images, prompts)]
    results = [p.result() for p in pending]
    jsonschema.validate(json.loads(results[0].text), SCHEMAS[0])
    for got, want in zip(results[1:], alone):
        assert got.tokens == want.tokens
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
