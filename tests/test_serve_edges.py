"""Issue 38 (S4 and the server risks) and issue 37's serving items, on real server processes.

A keyless server on 127.0.0.2 with --port 0 and --name: the banner names the real port, the Host
allowlist takes the server's own loopback address, /v1/models and chat's `model` use the served
name (another is a 404 listing it), one access-log line per request, cross-site browser requests
refused, a huge top_k clamped without disturbing its batch mates, an oversized chat body refused from
its Content-Length, a slow body cut off, an abandoned stream counted as 499 (no task left pending).
A keyed server with --protect-docs and a short --shutdown-timeout: docs behind the key, and SIGTERM
answers every running request (200 or 503) before the process exits.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import pytest
from serve_helpers import API_KEY, Server, b64, data_url, metric_samples, png_bytes

pytestmark = pytest.mark.slow

IMAGE = b64(png_bytes(seed=5))


@pytest.fixture(scope="module")
def keyless():
    srv = Server("--name", "shapes-run", "--max-slots", "4", "--body-timeout", "1", api_keys=(), host="127.0.0.2",
                 port=0)
    yield srv
    srv.stop()


def _raw(srv, head: bytes, body: bytes = b"", wait_s: float = 3.0) -> bytes:
    """Send raw bytes on one connection and read until the server closes it or `wait_s` passes."""
    with socket.create_connection((srv.host, srv.port), timeout=wait_s) as s:
        s.sendall(head + body)
        out = b""
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    return out + b"<closed>"
                out += chunk
        except TimeoutError:
            pass
        return out


def test_banner_port_loopback_host_and_served_name(keyless):
    assert keyless.port != 0 and f"on http://127.0.0.2:{keyless.port} " in keyless.log()
    with keyless.client() as c:
        models = c.get("/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["shapes-run"]


def test_unknown_model_is_404_listing_the_served_names(keyless):
    messages = [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                             {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]
    with keyless.client() as c:
        bad = c.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages, "max_tokens": 3})
        good = c.post("/v1/chat/completions", json={"model": "shapes-run", "messages": messages, "max_tokens": 3})
    assert bad.status_code == 404 and bad.json()["error"]["type"] == "model_not_found"
    assert "'shapes-run'" in bad.json()["error"]["message"] and bad.json()["error"]["param"] == "model"
    assert good.status_code == 200 and good.json()["model"] == "shapes-run"


def test_one_access_log_line_per_request(keyless):
    with keyless.client() as c:
        r = c.post("/v1/caption", json={"image": IMAGE, "max_new_tokens": 2})
    rid = r.headers["x-request-id"]
    time.sleep(0.2)
    lines = [line for line in keyless.log().splitlines() if f"id={rid}" in line]
    assert len(lines) == 1 and "POST /v1/caption 200 " in lines[0] and "model=shapes-run" in lines[0], lines


def test_cross_site_browser_requests_are_refused_without_a_key(keyless):
    own = f"http://127.0.0.2:{keyless.port}"
    body = json.dumps({"image": IMAGE, "max_new_tokens": 2})
    with keyless.client() as c:
        evil = c.post("/v1/caption", content=body, headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        fetch = c.post("/v1/caption", content=body, headers={"Sec-Fetch-Site": "cross-site",
                                                             "Content-Type": "application/json"})
        same = c.post("/v1/caption", content=body, headers={"Origin": own, "Sec-Fetch-Site": "same-origin",
                                                            "Content-Type": "application/json"})
    assert evil.status_code == 403 and evil.json()["error"]["type"] == "cross_site_request"
    assert fetch.status_code == 403
    assert same.status_code == 200, same.text


def test_huge_top_k_is_clamped_and_never_disturbs_its_batch_mates(keyless):
    def post(body):
        with keyless.client() as c:
            return c.post("/v1/predict", json={"image": IMAGE, "prompt": "caption en", "max_new_tokens": 6, **body})

    bodies = [{"top_k": 2**63, "temperature": 0.7, "seed": 1}, {"top_k": 10**30, "temperature": 0.7, "seed": 1}]
    bodies += [{} for _ in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers]
    assert answers[0].json()["tokens"] == answers[1].json()["tokens"]  # both: no top-k
    assert len({tuple(a.json()["tokens"]) for a in answers[2:]}) == 1
    assert "one by one" not in keyless.log()  # no batch was re-prefilled request by request


def test_oversized_chat_body_is_refused_before_it_is_read(keyless):
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.2:{keyless.port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {100 * 2**20}\r\n\r\n").encode()
    t0 = time.monotonic()
    out = _raw(keyless, head, b'{"messages": [', wait_s=3)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert time.monotonic() - t0 < 2


def test_a_slow_body_is_cut_off(keyless):
    head = (f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.2:{keyless.port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000\r\n\r\n").encode()
    t0 = time.monotonic()
    out = _raw(keyless, head, b'{"image": "', wait_s=4)  # then nothing: --body-timeout 1
    assert out.endswith(b"<closed>") and time.monotonic() - t0 < 3, out[:200]


def test_an_abandoned_stream_is_a_499_and_leaves_no_task_pending(keyless):
    messages = [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                             {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]
    body = {"messages": messages, "max_tokens": 512, "stream": True}
    with keyless.client() as c:
        before = metric_samples(c.get("/metrics").text, "palikit_requests_total")
        for _ in range(3):
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first chunk, then leave
        time.sleep(1.0)
        after = metric_samples(c.get("/metrics").text, "palikit_requests_total")
    key = 'palikit_requests_total{endpoint="/v1/chat/completions",status="%s"}'
    assert after.get(key % "499", 0) - before.get(key % "499", 0) == 3
    assert after.get(key % "200", 0) == before.get(key % "200", 0)
    assert "Task was destroyed" not in keyless.log()


@pytest.fixture(scope="module")
def protected():
    srv = Server("--protect-docs", "--shutdown-timeout", "1.5", "--max-slots", "2", "--no-access-log",
                 "--max-connections", "12")
    yield srv
    srv.stop()


def test_protect_docs_puts_docs_schema_playground_and_readyz_behind_the_key(protected):
    with httpx.Client(base_url=protected.url, timeout=10) as anon, protected.client() as keyed:
        for path in ("/docs", "/openapi.json", "/", "/readyz"):
            assert anon.get(path).status_code == 401, path
            assert keyed.get(path).status_code == 200, path
        assert anon.get("/healthz").status_code == 200


def test_connection_cap_and_no_access_log(protected):
    idle = [socket.create_connection((protected.host, protected.port)) for _ in range(12)]
    try:
        time.sleep(0.3)
        assert httpx.get(protected.url + "/healthz", timeout=5).status_code == 503  # beyond --max-connections
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert httpx.get(protected.url + "/healthz", timeout=5).status_code == 200
    assert "palikit.access" not in protected.log() and " /healthz 200 " not in protected.log()


def test_sigterm_answers_every_running_request(protected):
    def long(_):
        try:
            with protected.client(timeout=20) as c:
                r = c.post("/v1/predict", json={"image": IMAGE, "prompt": "caption en", "max_new_tokens": 512})
            return r.status_code, r.headers.get("retry-after")
        except httpx.TransportError as e:
            return type(e).__name__, None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long, i) for i in range(8)]  # 4 waves of the 2 slots: ~3 s of work
        time.sleep(0.5)
        t0 = time.monotonic()
        protected.proc.send_signal(15)
        answers = [f.result() for f in futures]
    protected.proc.wait(10)
    took = time.monotonic() - t0
    codes = [code for code, _ in answers]
    assert set(codes) <= {200, 503}, answers  # nobody is left without an answer
    assert 503 in codes and all(ra == "1" for code, ra in answers if code == 503)
    assert took < 1.5 + 2.5, took
    assert API_KEY not in protected.log()


def test_multipart_labels_accept_semicolons(keyless):
    with keyless.client() as c:
        r = c.post("/v1/detect", files={"image": ("a.png", png_bytes(), "image/png")},
                   data={"labels": "cat ; dog", "max_new_tokens": "2"})
    assert r.status_code == 200 and r.json()["prompt"] == "detect cat ; dog", r.text
