"""Hardening against a real `palikit serve` process: memory and time bounds for hostile images
(16 concurrent tiny-on-disk 6000x6000 PNGs; extreme aspect ratios in flight beside a normal request),
slowloris connections closed after the header timeout, the Host allowlist flag, client aborts
logged as one line and counted apart from server errors. The figures are printed (pytest -s)."""

from __future__ import annotations

import concurrent.futures
import io
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import API_KEY, metric_samples, png_bytes, server_fixture

pytestmark = pytest.mark.slow  # real server processes under hostile load

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = png_bytes(48, 32, seed=5)


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


server = server_fixture("--max-upload-mb", "4")


def _caption(c: httpx.Client, data: bytes, name: str = "x.png") -> httpx.Response:
    return c.post("/v1/caption", files={"image": (name, data, "image/png")}, data={"max_new_tokens": "4"})


def test_16_concurrent_6000x6000_pngs_stay_within_the_memory_bound(server):
    big = _png((6000, 6000))
    assert len(big) < 200_000  # tiny on disk, 108 MB once decoded to RGB
    pid = server.proc.pid
    with server.client() as c:
        for _ in range(2):  # allocator and thread pool warmed up before the baseline
            assert _caption(c, GOOD).status_code == 200
    time.sleep(0.5)
    start = _status_kb(pid, "VmRSS") / 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    peak = {"mb": start}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["mb"] = max(peak["mb"], _status_kb(pid, "VmRSS") / 1024)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    try:
        with server.client() as c, concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda _: _caption(c, big), range(16)))
    finally:
        stop.set()
        watcher.join()
    burst_s = time.perf_counter() - t0
    peak_mb = max(peak["mb"], _status_kb(pid, "VmHWM") / 1024)
    time.sleep(1.0)
    end = _status_kb(pid, "VmRSS") / 1024
    codes = [r.status_code for r in replies]
    print(f"\n16 x 6000x6000 PNG ({len(big)} bytes each): start RSS {start:.0f} MB, peak {peak_mb:.0f} MB "
          f"(+{peak_mb - start:.0f}), after {end:.0f} MB (+{end - start:.0f}); {codes.count(200)} answered, "
          f"{codes.count(429)} x 429; {burst_s:.1f} s")
    assert set(codes) <= {200, 429}, [r.text for r in replies if r.status_code not in (200, 429)]
    assert codes.count(200) >= 1
    for r in replies:
        if r.status_code == 200:
            assert r.json()["image_size"] == [6000, 6000]
        else:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "busy"
    assert peak_mb - start < 600
    assert end - start < 300
    with server.client() as c:
        assert _caption(c, GOOD).status_code == 200


def test_chat_with_8_large_frames_decodes_them_one_budget_at_a_time(server):
    from serve_helpers import data_url

    frame = data_url(_png((5000, 5000)))
    body = {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", "text": "caption en"}] +
                                           [{"type": "image_url", "image_url": {"url": frame}}] * 8}]}
    pid = server.proc.pid
    start = _status_kb(pid, "VmRSS") / 1024
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    with server.client() as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda _: c.post("/v1/chat/completions", json=body), range(2)))
    peak = _status_kb(pid, "VmHWM") / 1024
    print(f"\n2 chat requests x 8 frames of 5000x5000: start RSS {start:.0f} MB, peak {peak:.0f} MB "
          f"(+{peak - start:.0f}); {[r.status_code for r in replies]}")
    assert all(r.status_code in (200, 429) for r in replies), [r.text for r in replies]
    assert any(r.status_code == 200 for r in replies)
    assert peak - start < 600


def test_normal_request_is_fast_while_extreme_aspect_uploads_are_in_flight(server):
    extreme = _png((1, 39_999_999), "L")   # refused from the header: aspect ratio
    tall = _png((400, 40_000), "L")        # aspect 100:1, allowed: decoded and shrunk in a worker thread
    print(f"\n1x39,999,999 PNG: {len(extreme)} bytes; 400x40,000 PNG: {len(tall)} bytes")
    with server.client() as c:
        assert _caption(c, GOOD).status_code == 200
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c, \
            concurrent.futures.ThreadPoolExecutor(6) as pool:
        heavy = [pool.submit(_caption, c, data) for data in (extreme, extreme, extreme, tall, tall, tall)]
        time.sleep(0.05)
        t0 = time.perf_counter()
        r = _caption(c, GOOD)
        normal_s = time.perf_counter() - t0
        results = [f.result() for f in heavy]
    print(f"normal request with 3 extreme + 3 tall uploads in flight: {normal_s:.2f} s; heavy: "
          f"{[x.status_code for x in results]}")
    assert r.status_code == 200 and normal_s < 3.0
    for x in results[:3]:
        assert x.status_code == 400 and "aspect ratio" in x.json()["error"]["message"]
    for x in results[3:]:
        assert x.status_code in (200, 429), x.text


guarded = server_fixture("--header-timeout", "2", "--log-level", "info", "--allowed-hosts", "api.example.com,127.0.0.1")


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"", t0: float | None = None) -> float | None:
    """Seconds from `t0` (default: now) until the server closes the connection (None: still open after
    `seconds`), sending one byte of `trickle` every 0.3 s meanwhile."""
    t0 = time.perf_counter() if t0 is None else t0
    sock.settimeout(0.3)
    i = 0
    while time.perf_counter() - t0 < seconds:
        try:
            if i < len(trickle):
                sock.sendall(trickle[i:i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return time.perf_counter() - t0
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.perf_counter() - t0
    return None


def test_slowloris_and_silent_connections_are_closed_after_the_header_timeout(guarded):
    trickle = b"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", guarded.port)) as slow, \
            socket.create_connection(("127.0.0.1", guarded.port)) as silent:
        opened = time.perf_counter()
        with guarded.client() as c:
            assert _caption(c, GOOD).status_code == 200  # others are served meanwhile
        t_slow = _closed_within(slow, 8, trickle, opened)
        t_silent = _closed_within(silent, 8, t0=opened)
    print(f"\nheader timeout 2 s: slowloris closed {t_slow:.2f} s after opening, silent connection {t_silent:.2f} s")
    assert t_slow is not None and 1.5 < t_slow < 5
    assert t_silent is not None and 1.5 < t_silent < 5
    # a keep-alive client whose next request is slow to arrive is closed as well, after its first answer
    with socket.create_connection(("127.0.0.1", guarded.port)) as ka:
        ka.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in ka.recv(4096)
        assert _closed_within(ka, 8, b"GET /healthz HTTP/1.1\r\nHost: 127.0") is not None
    assert guarded.alive()


def test_allowed_hosts_flag(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        assert c.get("/healthz", headers={"Host": "api.example.com:8443"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "API.example.com"}).status_code == 200
        r = c.get("/healthz", headers={"Host": "localhost"})  # not in the configured list
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_host"


def test_client_aborts_are_one_info_line_and_not_server_errors(guarded):
    n = 5
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", guarded.port)) as s:
            s.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n".encode()
                      + b'{"image": "' + b"A" * 100_000)
            time.sleep(0.2)
    time.sleep(1.0)
    with guarded.client() as c:
        assert _caption(c, GOOD).status_code == 200
        metrics = c.get("/metrics").text
    log = guarded.log()
    aborts = metric_samples(metrics, "palikit_client_aborts_total")
    print(f"\n{n} aborted uploads: metrics {aborts}; log lines mentioning them: "
          f"{log.count('client disconnected')}")
    assert sum(aborts.values()) == n
    assert metric_samples(metrics, 'palikit_requests_total{endpoint="/v1/caption",status="499"}')
    assert 'status="500"' not in metrics
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert log.count("client disconnected") == n
