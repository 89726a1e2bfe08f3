"""`/v1/chat/completions` with the official `openai` Python client against a real server process:
normal and streaming completions equal `PaliGemma.predict` / `PaliGemma.stream` on the same image and
prompt; finish reasons, usage, follow-up turns reuse the image; errors arrive as OpenAI errors."""

from __future__ import annotations

import io

import openai
import pytest
from PIL import Image
from serve_helpers import data_url, one_thread, png_bytes
from serve_helpers import pg, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a real server process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)


def _msg(text: str, data: bytes) -> list[dict]:
    return [{"role": "system", "content": "You are helpful."},  # ignored: PaliGemma has no chat template
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("prompt", ["caption en", "answer en what is this", "detect cat ; dog"])
def test_chat_completion_equals_predict(client, pg, prompt):
    data = png_bytes(70, 50, seed=len(prompt))
    with one_thread():
        expected = pg.predict(Image.open(io.BytesIO(data)), prompt, max_new_tokens=12)
    resp = client.chat.completions.create(model="tiny", messages=_msg(prompt, data), max_tokens=12)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    n = len(expected.tokens)
    assert choice.finish_reason == ("length" if n == 12 else "stop")
    assert resp.usage.completion_tokens == n
    image_tokens = pg.model.config.vision.num_image_tokens
    assert resp.usage.prompt_tokens == image_tokens + len(pg.tokenizer.encode_prompt(prompt).ids)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")


def test_streaming_chat_completion_equals_stream_and_predict(client, pg):
    data = png_bytes(50, 80, seed=3)
    im = Image.open(io.BytesIO(data))
    with one_thread():
        pieces = list(pg.stream(im, "describe en", max_new_tokens=14))
        text = pg.predict(im, "describe en", max_new_tokens=14).text
    stream = client.chat.completions.create(model="tiny", messages=_msg("describe en", data), max_completion_tokens=14,
                                            stream=True, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            finish = c.finish_reason or finish
    assert deltas == [p for p in pieces if p]
    assert "".join(deltas) == text
    assert finish == ("length" if len(pieces) == 14 else "stop")
    assert usage is not None and usage.completion_tokens == len(pieces)


def test_follow_up_turn_reuses_the_last_image_and_plain_string_content(client, pg):
    data = png_bytes(33, 44, seed=9)
    with one_thread():
        expected = pg.predict(Image.open(io.BytesIO(data)), "answer en how many", max_new_tokens=6).text
    messages = _msg("caption en", data) + [{"role": "assistant", "content": "a picture"},
                                           {"role": "user", "content": "answer en   how many"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert resp.choices[0].message.content == expected


def test_models_and_errors_through_the_openai_client(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "caption en"}])
    assert "no image" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "text", "text": "caption en"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert "not fetched" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=_msg("caption en", png_bytes()), n=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_msg("caption en", png_bytes()), max_tokens=100000)
    assert "max_new_tokens" in e.value.body["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=_msg("caption en", png_bytes()))
