"""Bad inputs against a real server process: every one answers a 4xx with a clear JSON error
`{"error": {"type", "message"}}` that echoes no internals, and the server keeps answering correctly
afterwards. Also: the loud warning for a non-loopback bind without API key."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image
from serve_helpers import API_KEY, b64, bomb_png, one_thread, png_bytes, reference_model, shared_server

pytestmark = pytest.mark.slow  # a real server process

GOOD = png_bytes(48, 32, seed=11)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _truncated_png() -> bytes:
    return GOOD[: len(GOOD) // 2]


def _corrupt_jpeg() -> bytes:
    data = bytearray(png_bytes(64, 64, seed=2, fmt="JPEG"))
    data[200:400] = b"\x00" * 200
    return bytes(data[:600])


def _j(**kw):
    return {"json": {"image": b64(GOOD), **kw}}


# (id, path, request kwargs, headers, expected status, expected error type, substring of the message)
MATRIX = [
    ("corrupt-bytes", "/v1/caption", {"files": {"image": ("x.png", b"\x89PNG not really", "image/png")}}, AUTH, 400,
     "invalid_image", "not a supported image format"),
    ("truncated-png", "/v1/caption", {"files": {"image": ("x.png", _truncated_png(), "image/png")}}, AUTH, 400,
     "invalid_image", "truncated or corrupt"),
    ("corrupt-jpeg-base64", "/v1/caption", {"json": {"image": b64(_corrupt_jpeg())}}, AUTH, 400, "invalid_image", "image"),
    ("empty-upload", "/v1/ocr", {"files": {"image": ("x.png", b"", "image/png")}}, AUTH, 400, "invalid_request", "empty"),
    ("text-file-upload", "/v1/ocr", {"files": {"image": ("x.txt", b"hello world", "text/plain")}}, AUTH, 400,
     "invalid_image", "image format"),
    ("bomb-pillow-limit", "/v1/caption", {"files": {"image": ("b.png", bomb_png(20000), "image/png")}}, AUTH, 413,
     "image_too_large", "too many pixels"),
    ("bomb-server-limit", "/v1/caption", {"files": {"image": ("b.png", bomb_png(8000), "image/png")}}, AUTH, 413,
     "image_too_large", "8000x8000"),
    ("wrong-content-type", "/v1/caption", {"content": b"image bytes", "headers": {"content-type": "image/png"}}, AUTH,
     415, "unsupported_media_type", "multipart/form-data"),
    ("no-content-type", "/v1/caption", {"content": b"{}"}, AUTH, 415, "unsupported_media_type", "Content-Type"),
    ("chat-as-form", "/v1/chat/completions", {"data": {"a": "b"}}, AUTH, 415, "unsupported_media_type", "json"),
    ("invalid-json", "/v1/predict", {"content": b'{"image": "abc", "prompt": ', "headers": {"content-type": "application/json"}},
     AUTH, 400, "invalid_json", "not valid JSON"),
    ("json-array", "/v1/predict", {"json": [1, 2]}, AUTH, 400, "invalid_json", "JSON object"),
    ("empty-body", "/v1/predict", {"content": b"", "headers": {"content-type": "application/json"}}, AUTH, 400,
     "invalid_json", "empty"),
    ("missing-image", "/v1/predict", {"json": {"prompt": "caption en"}}, AUTH, 400, "invalid_request", "image: field required"),
    ("missing-prompt", "/v1/predict", _j(), AUTH, 400, "invalid_request", "prompt: field required"),
    ("empty-prompt", "/v1/predict", _j(prompt="   "), AUTH, 400, "invalid_request", "prompt is empty"),
    ("oversized-prompt", "/v1/predict", _j(prompt="caption " * 1000), AUTH, 400, "invalid_request", "at most 2000"),
    ("too-many-prompt-tokens", "/v1/predict", _j(prompt="a " * 700), AUTH, 400, "invalid_request", "tokens"),
    ("negative-max-new-tokens", "/v1/caption", _j(max_new_tokens=-5), AUTH, 400, "invalid_request", "max_new_tokens"),
    ("zero-max-new-tokens", "/v1/caption", _j(max_new_tokens=0), AUTH, 400, "invalid_request", "max_new_tokens"),
    ("huge-max-new-tokens", "/v1/caption", _j(max_new_tokens=10**6), AUTH, 400, "invalid_request", "at most 512"),
    ("temperature-string", "/v1/caption", _j(temperature="hot"), AUTH, 400, "invalid_request", "temperature"),
    ("temperature-numeric-string", "/v1/caption", _j(temperature="0.5"), AUTH, 400, "invalid_request", "temperature"),
    ("negative-temperature", "/v1/caption", _j(temperature=-1), AUTH, 400, "invalid_request", "temperature"),
    ("top-p-too-big", "/v1/caption", _j(temperature=1.0, top_p=1.5), AUTH, 400, "invalid_request", "top_p"),
    ("beams-with-sampling", "/v1/caption", _j(num_beams=2, temperature=0.7), AUTH, 400, "invalid_request", "beam"),
    ("bad-coord-denominator", "/v1/detect", _j(labels="cat", coord_denominator=1000), AUTH, 400, "invalid_request", "1024"),
    ("unknown-field", "/v1/caption", _j(max_tokens=5), AUTH, 400, "invalid_request", "unknown field"),
    ("form-bad-number", "/v1/caption", {"files": {"image": ("x.png", GOOD, "image/png")}, "data": {"max_new_tokens": "lots"}},
     AUTH, 400, "invalid_request", "max_new_tokens"),
    ("unsupported-language", "/v1/caption", _j(lang="xx"), AUTH, 400, "invalid_request", "unsupported language"),
    ("empty-labels", "/v1/detect", _j(labels=[]), AUTH, 400, "invalid_request", "label"),
    ("label-with-markup", "/v1/segment", _j(labels=["<loc0001>"]), AUTH, 400, "invalid_request", "special tokens"),
    ("question-missing", "/v1/answer", _j(), AUTH, 400, "invalid_request", "question"),
    ("image-url", "/v1/caption", {"json": {"image": "https://example.com/cat.png"}}, AUTH, 400, "unsupported_image_source",
     "not fetched"),
    ("image-path", "/v1/caption", {"json": {"image": "/etc/passwd"}}, AUTH, 400, "unsupported_image_source",
     "never reads files"),
    ("image-filename", "/v1/caption", {"json": {"image": "cat.png"}}, AUTH, 400, "unsupported_image_source",
     "never reads files"),
    ("image-not-base64", "/v1/caption", {"json": {"image": "this is not base64!"}}, AUTH, 400, "invalid_request", "base64"),
    ("image-not-a-string", "/v1/caption", {"json": {"image": 12345}}, AUTH, 400, "invalid_request", "image"),
    ("data-url-not-base64", "/v1/caption", {"json": {"image": "data:image/png,rawbytes"}}, AUTH, 400, "invalid_request",
     "base64"),
    ("unexpected-file-field", "/v1/caption", {"files": {"photo": ("x.png", GOOD, "image/png")}}, AUTH, 400,
     "invalid_request", "'image'"),
    ("oversized-image", "/v1/caption", {"files": {"image": ("x.bmp", png_bytes(1000, 800, fmt="BMP"), "image/bmp")}},
     AUTH, 413, "payload_too_large", "at most"),
    ("oversized-body", "/v1/caption", {"content": b"0" * (12 * 1024 * 1024), "headers": {"content-type": "application/json"}},
     AUTH, 413, "payload_too_large", "at most"),
    ("chat-no-image", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "caption en"}]}}, AUTH, 400,
     "invalid_request", "no image"),
    ("chat-no-user", "/v1/chat/completions", {"json": {"messages": [{"role": "system", "content": "hi"}]}}, AUTH, 400,
     "invalid_request", "no user message"),
    ("chat-bad-role", "/v1/chat/completions", {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, AUTH, 400,
     "invalid_request", "role"),
    ("chat-stop", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}},
     AUTH, 400, "invalid_request", "stop"),
    ("no-api-key", "/v1/caption", _j(), {}, 401, "unauthorized", "missing API key"),
    ("wrong-api-key", "/v1/caption", _j(), {"Authorization": "Bearer nope"}, 401, "unauthorized", "invalid API key"),
    ("basic-auth", "/v1/caption", _j(), {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthorized", "invalid API key"),
    ("unknown-endpoint", "/v1/nothing", {"json": {}}, AUTH, 404, "not_found", "no such endpoint"),
    ("wrong-method", "/v1/caption", {"method": "GET"}, AUTH, 405, "method_not_allowed", "GET"),
]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.mark.parametrize("case", MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_gets_a_clear_4xx(server, case):
    _, path, kwargs, headers, status, kind, fragment = case
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    extra = kwargs.pop("headers", {})
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.request(method, path, headers={**headers, **extra}, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["type"] == kind, err
    assert fragment.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in r.text and "/work/" not in r.text and "site-packages" not in r.text and ".py" not in r.text
    assert len(err["message"]) < 600
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_server_still_answers_correctly_after_the_matrix(server):
    with one_thread():
        expected = reference_model().caption(Image.open(io.BytesIO(GOOD)), max_new_tokens=8).text
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        for _ in range(3):
            r = c.post("/v1/caption", files={"image": ("x.png", GOOD, "image/png")}, data={"max_new_tokens": "8"})
            assert r.status_code == 200 and r.json()["text"] == expected
        metrics = c.get("/metrics").text
    assert 'palikit_requests_total{endpoint="/v1/caption",status="413"}' in metrics
    assert 'palikit_requests_total{endpoint="other",status="404"}' in metrics
    assert server.alive()


def test_errors_never_leak_internals(server):
    """Even a request that trips a library error deep inside answers a short, path-free message."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/predict", json={"image": b64(GOOD), "prompt": "caption en", "max_new_tokens": 2,
                                        "num_beams": 2, "top_k": 3})
    assert r.status_code in (200, 400)
    assert ".py" not in r.text and "Traceback" not in r.text
    json.loads(r.text)


def test_non_loopback_bind_without_key_warns_loudly(capfd, monkeypatch):
    from palikit.cli import (
        main,
        serve,  # noqa: F401  (registers the command)
    )
    from palikit.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    monkeypatch.delenv("PALIKIT_API_KEYS", raising=False)
    # the model does not exist, so nothing is ever bound: only the warning is exercised
    code = main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent/model-folder"])
    err = capfd.readouterr().err
    assert code != 0
    assert "WARNING" in err and "NO API key" in err and "0.0.0.0" in err


def test_oversized_chunked_body_is_cut_off(server):
    """No Content-Length (chunked upload): the server counts bytes as they arrive and stops at its cap."""
    def chunks():
        for _ in range(40):
            yield b"0" * (512 * 1024)  # 20 MB in all; the test server's cap is ~11 MB

    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        try:
            r = c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        except httpx.TransportError:  # the server may close the connection while we still send
            r = None
        if r is not None:
            assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
        ok = c.post("/v1/caption", files={"image": ("x.png", GOOD, "image/png")}, data={"max_new_tokens": "4"})
    assert ok.status_code == 200


def test_streaming_client_that_disconnects_does_not_break_the_server(server):
    from serve_helpers import data_url

    body = {"stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe en"}, {"type": "image_url", "image_url": {"url": data_url(GOOD)}}]}]}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        # closed after one event; the server must go on answering
        ok = c.post("/v1/caption", files={"image": ("x.png", GOOD, "image/png")}, data={"max_new_tokens": "4"})
        assert ok.status_code == 200
        assert c.get("/readyz").json()["status"] == "ready"
