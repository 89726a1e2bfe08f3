"""The HTTP server as a real `palikit serve` process on loopback, driven with httpx: every task
endpoint (multipart and base64 JSON) answers exactly what `PaliGemma` answers in-process; concurrent
requests are micro-batched (also with mixed options); health, readiness, metrics and docs."""

from __future__ import annotations

import concurrent.futures
import io

import httpx

import pytest
from PIL import Image
from serve_helpers import assert_same_result, b64, metric_samples, one_thread, png_bytes, shared_server
from serve_helpers import pg, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a real server process

MNT = 10


def _img(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


CASES = [
    ("caption", {"lang": "en"}, lambda pg, im: pg.caption(im, "en", max_new_tokens=MNT)),
    ("describe", {"lang": "de"}, lambda pg, im: pg.describe(im, "de", max_new_tokens=MNT)),
    ("ocr", {}, lambda pg, im: pg.ocr(im, max_new_tokens=MNT)),
    ("answer", {"question": "what color is the car"}, lambda pg, im: pg.answer(im, "what color is the car", max_new_tokens=MNT)),
    ("detect", {"labels": ["cat", "dog"]}, lambda pg, im: pg.detect(im, ["cat", "dog"], max_new_tokens=MNT)),
    ("segment", {"labels": ["circle"]}, lambda pg, im: pg.segment(im, ["circle"], max_new_tokens=MNT)),
    ("predict", {"prompt": "answer en how many dogs"}, lambda pg, im: pg.predict(im, "answer en how many dogs", max_new_tokens=MNT)),
]


@pytest.mark.parametrize("task,fields,direct", CASES, ids=[c[0] for c in CASES])
def test_task_endpoints_equal_direct_predict(server, pg, task, fields, direct):
    data = png_bytes(90, 60, seed=len(task) * 7 + len(fields))
    with one_thread():
        expected = direct(pg, _img(data)).to_dict()
    with server.client() as c:
        r_json = c.post(f"/v1/{task}", json={"image": b64(data), "max_new_tokens": MNT, **fields})
        form = {k: (" ; ".join(v) if isinstance(v, list) else v) for k, v in fields.items()}
        r_form = c.post(f"/v1/{task}", files={"image": ("x.png", data, "image/png")},
                        data={"max_new_tokens": str(MNT), **form})
    for r in (r_json, r_form):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny"
        assert_same_result(body, expected)
        assert body["image_size"] == [90, 60]
        assert {"image_ms", "prefill_ms"} <= set(body["timings"])


def test_jpeg_and_data_url_inputs(server, pg):
    data = png_bytes(64, 48, seed=7, fmt="JPEG")
    with one_thread():
        expected = pg.predict(_img(data), "caption en", max_new_tokens=MNT).text
    with server.client() as c:
        r = c.post("/v1/predict", json={"image": f"data:image/jpeg;base64,{b64(data)}", "prompt": "caption en",
                                        "max_new_tokens": MNT})
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expected


def test_concurrent_requests_with_mixed_options_decode_together_and_exact(server, pg):
    images = [png_bytes(40 + 3 * i, 30 + 2 * i, seed=100 + i) for i in range(6)]
    jobs = [(images[i % 6], ["caption en", "ocr", "detect cat"][i % 3], [4, 9][i % 2]) for i in range(24)]
    with one_thread():
        expected = [pg.predict(_img(d), p, max_new_tokens=m).to_dict() for d, p, m in jobs]
    with server.client() as c:
        before = metric_samples(c.get("/metrics").text, "palikit_decode")

        def call(job):
            d, p, m = job
            return c.post("/v1/predict", json={"image": b64(d), "prompt": p, "max_new_tokens": m})

        with concurrent.futures.ThreadPoolExecutor(12) as ex:
            responses = list(ex.map(call, jobs))
        after = metric_samples(c.get("/metrics").text, "palikit_decode")
    for r, exp in zip(responses, expected):
        assert r.status_code == 200, r.text
        assert_same_result(r.json(), exp)
    steps = after["palikit_decode_steps"] - before["palikit_decode_steps"]
    slot_steps = after["palikit_decode_slot_steps"] - before["palikit_decode_slot_steps"]
    assert steps > 0 and slot_steps / steps > 1.5, "requests did not decode together"


def test_health_ready_metrics_models_and_docs(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model"] == "tiny"
        m = c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        for name in ("palikit_requests_total", "palikit_request_duration_seconds_bucket",
                     "palikit_generation_duration_seconds_bucket", "palikit_live_slots", "palikit_slots",
                     "palikit_tokens_per_second", "palikit_image_cache_hit_rate", "palikit_queue_depth", "palikit_inflight_requests", "palikit_generated_tokens_total"):
            assert name in m.text
        assert 'palikit_requests_total{endpoint="/healthz",status="200"}' in m.text
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        spec = c.get("/openapi.json").json()
        for path in ("/v1/predict", "/v1/caption", "/v1/ocr", "/v1/answer", "/v1/detect", "/v1/segment",
                     "/v1/chat/completions", "/healthz", "/readyz", "/metrics"):
            assert path in spec["paths"], path
        body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(body)
        docs = c.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        r = c.get("/")
        assert r.status_code == 200 and "palikit playground" in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-request-id"]


def test_open_paths_need_no_key_but_the_api_does(server):
    import httpx

    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "unauthorized"


def test_docs_page_works_offline():
    """Swagger UI is served from the installed swagger-ui-bundle, not a CDN (servers are often offline)."""
    srv = shared_server()
    page = httpx.get(srv.url + "/docs", timeout=30)
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn.jsdelivr" not in page.text
    js = httpx.get(srv.url + "/docs-assets/swagger-ui-bundle.js", timeout=30)
    assert js.status_code == 200 and len(js.content) > 100_000
