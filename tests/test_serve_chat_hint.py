"""The prompt hint reaches `/v1/chat/completions` (issue 37): a prompt PaliGemma is unlikely to answer as
meant gets `{"palikit": {"hint": ...}}` on the response (the last chunk of a stream) and one server log
line; a well-formed prompt gets neither. A real server process and the official `openai` client."""

from __future__ import annotations

import io
import time

import openai
import pytest
from PIL import Image
from serve_helpers import Server, data_url, one_thread, png_bytes, reference_model

pytestmark = pytest.mark.slow  # a real server process

PROMPT = "Detect the Zebra ; cat"  # keyword case, an article, a capital, and a word the tiny tokenizer spells


@pytest.fixture(scope="module")
def server():
    srv = Server("--log-level", "info")  # the hint's log line is an info line (the default level of palikit serve)
    yield srv
    srv.stop()


def _msg(text: str, data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                         {"type": "text", "text": text}]}]


def test_chat_response_carries_the_prompt_hint_and_logs_it(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0, timeout=60)
    data = png_bytes(64, 48, seed=5)
    with one_thread():
        expected = reference_model().predict(Image.open(io.BytesIO(data)), PROMPT, max_new_tokens=6).hint
    assert expected.startswith('use "detect zebra ; cat": task keywords are lower case') and \
        'cannot write "zebra" (letter by letter: z e b r a)' in expected  # the model's tokenizer reached the hint

    resp = client.chat.completions.create(model="tiny", messages=_msg(PROMPT, data), max_tokens=6)
    assert resp.model_extra["palikit"] == {"hint": expected}  # main: no hint on chat responses
    stream = client.chat.completions.create(model="tiny", messages=_msg(PROMPT, data), max_tokens=6, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].model_extra["palikit"] == {"hint": expected}
    assert all("palikit" not in c.model_extra for c in chunks[:-1])

    plain = client.chat.completions.create(model="tiny", messages=_msg("detect cat ; dog", data), max_tokens=6)
    assert "palikit" not in (plain.model_extra or {})
    deadline = time.monotonic() + 10
    while server.log().count("prompt hint for chat prompt") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    assert log.count("prompt hint for chat prompt 'Detect the Zebra ; cat'") == 2 and expected in log
    assert "prompt hint for chat prompt 'detect cat ; dog'" not in log
