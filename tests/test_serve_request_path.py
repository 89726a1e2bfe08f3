"""The server's request path does each piece of work once per request (issue 31): the prompt is
tokenized once, the image loaded once, the generated ids turned into text once, the labels cleaned
once (not re-split by the parser), the options passed as the one `PredictOptions` (no dict and back),
and the masks of a result decoded in one codec call. In-process app (httpx ASGI transport) around the
bundled demo model, which answers `detect` with boxes and `segment` with several masks; counters wrap
the real tokenizer, image loader, label rule and mask codec. The answers equal the library's."""

from __future__ import annotations

import asyncio
import io
from collections import Counter

import httpx
import pytest
from serve_helpers import assert_same_result, b64

import palikit.preprocess
import palikit.tasks.labels
from palikit.api import PaliGemma
from palikit.assets import bundled_demo_model
from palikit.demo.shapes import SPLIT_SEEDS, make_sample
from palikit.serve import ServerSettings, create_app
from palikit.tasks.options import PredictOptions


@pytest.fixture(scope="module")
def pg():
    folder = bundled_demo_model()
    assert folder is not None, "the package ships no demo model (src/palikit/assets/demo-model)"
    return PaliGemma.from_pretrained(str(folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def image_png(pg) -> bytes:
    sample = make_sample(0, seed=SPLIT_SEEDS["test"], size=pg.processor.size)  # a circle and a triangle
    buf = io.BytesIO()
    sample.image.save(buf, "PNG")
    return buf.getvalue()


def _count(monkeypatch, calls: Counter, owner, name: str, key: str | None = None) -> None:
    real = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[key or name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def _serve(pg, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async def main():
        app = create_app(pg, ServerSettings(warmup=False))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return [await client.post(path, json=body) for path, body in requests]

    return asyncio.run(main())


@pytest.mark.parametrize("task, labels, masks", [("detect", "circle ; triangle", 0),
                                                 ("segment", "circle ; square ; triangle", 2)])
def test_each_piece_of_work_happens_once_per_request(pg, image_png, monkeypatch, task, labels, masks):
    calls: Counter = Counter()
    tok = pg.tokenizer
    _count(monkeypatch, calls, tok, "encode_prompt", "tokenize")
    _count(monkeypatch, calls, tok, "decode", "ids_to_text")
    _count(monkeypatch, calls, tok, "token_texts", "ids_to_text")
    _count(monkeypatch, calls, palikit.preprocess, "load_image")
    _count(monkeypatch, calls, palikit.tasks.labels, "split_labels")
    _count(monkeypatch, calls, pg.mask_codec, "decode", "mask_codec")
    _count(monkeypatch, calls, PredictOptions, "from_kwargs", "options_from_dict")
    _count(monkeypatch, calls, PredictOptions, "as_kwargs", "options_to_dict")

    body = {"image": b64(image_png), "labels": labels, "max_new_tokens": 120}
    (r,) = _serve(pg, [(f"/v1/{task}", body)])
    assert r.status_code == 200, r.text
    got = r.json()
    assert sum(d["mask"] is not None for d in got["detections"]) >= masks and got["detections"]
    assert dict(calls) == {"tokenize": 1, "ids_to_text": 1, "load_image": 1, "split_labels": 1,
                           **({"mask_codec": 1} if masks else {})}, dict(calls)

    from PIL import Image

    expected = getattr(pg, task)(Image.open(io.BytesIO(image_png)), labels, max_new_tokens=120)
    assert_same_result(got, expected.to_dict())


def test_labels_are_cleaned_once_and_travel_as_labels(monkeypatch):
    from palikit.tasks.labels import Labels, clean_labels, requested_labels
    from palikit.tasks.parse import parse_detections
    from palikit.tasks.prompts import detect
    from palikit.tasks.registry import get_task

    prompt, labels = get_task("detect").prompt({"labels": " big   dog ; cat "})
    assert isinstance(labels, Labels) and labels == ["big dog", "cat"] and prompt == "detect big dog ; cat"
    calls: Counter = Counter()
    _count(monkeypatch, calls, palikit.tasks.labels, "split_labels")
    assert clean_labels(labels) is labels and requested_labels(labels) is labels and detect(labels) == prompt
    box = "<loc0001><loc0002><loc0003><loc0004>"
    parsed = parse_detections(f"{box} cats ; {box} dog", (10, 10), requested_labels=labels)
    assert calls["split_labels"] == 0  # not re-split, not re-checked by the prompt builder or the parser
    assert [(d.label, d.requested) for d in parsed.detections] == [("cats", True), ("dog", False)]
