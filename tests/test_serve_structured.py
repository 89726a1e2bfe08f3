"""Structured outputs through the official `openai` client against a real `palikit serve` process (a tiny
random checkpoint whose tokenizer writes JSON): `chat.completions.parse` with a pydantic model (OpenAI's
strict json_schema), a plain json_schema response_format, vLLM's `guided_choice` as an extra body field,
and an invalid regex as an OpenAI BadRequestError naming the field."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serve_helpers import Server, data_url, png_bytes

pytestmark = pytest.mark.slow  # a real server process


class Shape(BaseModel):
    shape: Literal["circle", "square", "triangle"]
    count: int = Field(ge=0, le=9)
    visible: bool


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from palikit.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("json") / "ckpt", family="pg2", seed=5, extra_chars="{}[]")
    srv = Server(model=folder)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.api_key, max_retries=0, timeout=60)
    srv.stop()


def _messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(40, 30, seed=seed))}},
                                         {"type": "text", "text": "answer en what is this"}]}]


def test_parse_with_a_pydantic_model(client):
    resp = client.chat.completions.parse(model="ckpt", messages=_messages(1), response_format=Shape, max_tokens=80)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Shape)
    assert msg.parsed == Shape.model_validate_json(msg.content)


def test_json_schema_and_guided_choice(client):
    schema = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 6},
                                               "box": {"type": "array", "items": {"type": "integer", "maximum": 99,
                                                                                  "minimum": 0},
                                                       "minItems": 4, "maxItems": 4}},
              "required": ["label", "box"], "additionalProperties": False}
    resp = client.chat.completions.create(model="ckpt", messages=_messages(2), max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "box", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    choices = ["a cat", "two dogs", "nothing"]
    resp = client.chat.completions.create(model="ckpt", messages=_messages(3), max_tokens=20,
                                          extra_body={"guided_choice": choices})
    assert resp.choices[0].message.content in choices


def test_invalid_regex_is_a_bad_request_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ckpt", messages=_messages(4), extra_body={"guided_regex": "a{3,1}"})
    assert e.value.body["param"] == "guided_regex" and "invalid regex" in e.value.body["message"]
