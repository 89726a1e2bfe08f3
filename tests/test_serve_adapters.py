"""Multi-LoRA on a real `palikit serve` process (issue 34): `--adapter NAME=PATH` adapters served side
by side with the base model, each answer equal to the same request on a model with that adapter
merged; `"adapter"` on task endpoints, chat `model: NAME`, `/v1/models`, runtime `POST /v1/adapters`
(paths under --adapter-dir only, API key required) and `DELETE`, 404 naming the loaded adapters, 400
for a bad adapter file with the server still serving, requests per adapter on /metrics."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import Server, b64, data_url, metric_samples, one_thread, png_bytes, tiny_checkpoint

from helpers.lora import targets, write_peft_adapter

pytestmark = pytest.mark.slow
MNT = 6


@pytest.fixture(scope="module")
def setup():
    root = Path(tempfile.mkdtemp(prefix="palikit-adapters-"))
    base = tiny_checkpoint()
    ocr = write_peft_adapter(base, root / "ocr", r=4, alpha=8.0, target_modules=targets(decoder="q_proj|v_proj"))
    det = write_peft_adapter(base, root / "dirs" / "det", r=2, alpha=4.0, seed=1,
                             target_modules=targets(decoder="o_proj", tower="fc1", projector=True))
    bad = root / "dirs" / "corrupt"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    srv = Server("--adapter", f"ocr={ocr}", "--adapter-dir", str(root / "dirs"), "--max-loras", "2",
                 "--max-lora-rank", "4")
    yield srv, {"ocr": ocr, "det": det}
    srv.stop()


def _merged(path):
    from palikit.api import PaliGemma

    return PaliGemma.from_pretrained(tiny_checkpoint(), device="cpu", adapter=path)


def test_adapters_side_by_side_equal_their_merged_models(setup):
    srv, paths = setup
    data = png_bytes(seed=3)
    image = Image.open(io.BytesIO(data))
    with srv.client() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids[1:] == ["ocr"] and len(ids) == 2
        r = c.post("/v1/adapters", json={"name": "det", "path": "det"})  # relative to --adapter-dir
        assert r.status_code == 200, r.text
        assert [m["id"] for m in c.get("/v1/models").json()["data"]][1:] == ["det", "ocr"]
        got = {name: c.post("/v1/caption", json={"image": b64(data), "max_new_tokens": MNT, "adapter": name}).json()
               for name in ("ocr", "det", None)}
        messages = [{"role": "user", "content": [{"type": "text", "text": "caption en"},
                                                 {"type": "image_url", "image_url": {"url": data_url(data)}}]}]
        chat = c.post("/v1/chat/completions", json={"model": "ocr", "max_tokens": MNT, "messages": messages}).json()
        base_chat = c.post("/v1/chat/completions", json={"max_tokens": MNT, "messages": messages}).json()
        metrics = metric_samples(c.get("/metrics").text, "palikit_adapter_requests")
        events = c.post("/v1/chat/completions", json={"model": "det", "max_tokens": MNT, "stream": True,
                                                      "messages": messages}).text
        chunks = [json.loads(line[6:]) for line in events.splitlines() if line.startswith("data: {")]
    with one_thread():
        for name in ("ocr", "det"):
            want = _merged(paths[name]).caption(image, "en", max_new_tokens=MNT)
            assert got[name]["tokens"] == want.tokens, name
        assert chat["choices"][0]["message"]["content"] == got["ocr"]["text"]
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == got["det"]["text"]
        base = _merged(None).caption(image, "en", max_new_tokens=MNT)
        assert got[None]["tokens"] == base.tokens
    # an answer names the model that wrote it: the adapter a chat asked for, else the base model
    assert chat["model"] == "ocr" and base_chat["model"] == ids[0]
    assert len(chunks) > 2 and {ch["model"] for ch in chunks} == {"det"}
    assert metrics['palikit_adapter_requests{adapter="ocr"}'] == 2.0
    assert metrics['palikit_adapter_requests{adapter="det"}'] == 1.0


def test_adapter_errors_over_http(setup):
    srv, paths = setup
    with srv.client() as c:
        r = c.post("/v1/caption", json={"image": b64(png_bytes()), "adapter": "nope"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "adapter_not_found"
        assert "loaded adapters: " in r.json()["error"]["message"] and "ocr" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "x", "path": "corrupt"})
        assert r.status_code == 400 and "cannot read it" in r.json()["error"]["message"], r.text
        r = c.post("/v1/adapters", json={"name": "x", "path": str(paths["ocr"])})  # outside --adapter-dir
        assert r.status_code == 400 and "--adapter-dir" in r.json()["error"]["message"]
        r = c.post("/v1/adapters", json={"name": "x", "path": "../ocr"})
        assert r.status_code == 400
        r = httpx.post(srv.url + "/v1/adapters", json={"name": "x", "path": "det"})  # no API key
        assert r.status_code == 401
        assert c.post("/v1/caption", json={"image": b64(png_bytes()), "max_new_tokens": 2,
                                           "adapter": "ocr"}).status_code == 200  # still serving
        assert c.delete("/v1/adapters/ocr").status_code == 200
        r = c.post("/v1/caption", json={"image": b64(png_bytes()), "adapter": "ocr"})
        assert r.status_code == 404 and "ocr" not in r.json()["error"]["message"].split("loaded adapters:")[1]
        assert c.delete("/v1/adapters/ocr").status_code == 404
