"""The browser playground in headless Chromium (Playwright + Debian's /usr/bin/chromium) against a
real server process: upload an image, pick a task, run it; the page shows the same text the model
gives in-process; boxes and RLE masks are drawn on the canvas; server errors are shown to the user;
the page loads nothing from outside the server."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from serve_helpers import API_KEY, one_thread, png_bytes, reference_model, shared_server

pytestmark = pytest.mark.slow  # a real server process and chromium

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        ctx = browser.new_context()
        page = ctx.new_page()
        page.outside = []
        page.console_errors = []

        def on_request(r):
            if not r.url.startswith((server.url + "/", "blob:" + server.url + "/", "data:")):
                page.outside.append(r.url)

        page.on("request", on_request)
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.goto(server.url + "/")
        yield page
        browser.close()


def _run(page, tmp_path, task: str, text: str = "", data: bytes | None = None, key: str = API_KEY):
    img = tmp_path / f"{task}.png"
    img.write_bytes(data if data is not None else png_bytes(120, 80, seed=5))
    page.set_input_files("#file", str(img))
    page.wait_for_selector("#run:not([disabled])")
    page.select_option("#task", task)
    page.fill("#text", text)
    page.fill("#max-new-tokens", "10")
    page.fill("#api-key", key)
    page.evaluate("() => { document.getElementById('status').textContent = ''; }")
    page.click("#run")
    expect(page.locator("#status")).to_have_text(re.compile(r"^(Done|Error)"), timeout=30000)
    return page.text_content("#status")


def test_playground_runs_tasks_and_shows_the_models_text(page, tmp_path):
    data = png_bytes(120, 80, seed=5)
    im = Image.open(io.BytesIO(data))
    pg = reference_model()
    for task, text, direct in [
        ("caption", "", lambda: pg.caption(im, max_new_tokens=10)),
        ("answer", "what is this", lambda: pg.answer(im, "what is this", max_new_tokens=10)),
        ("detect", "cat ; dog", lambda: pg.detect(im, ["cat", "dog"], max_new_tokens=10)),
    ]:
        status = _run(page, tmp_path, task, text, data)
        assert status.startswith("Done"), status
        with one_thread():
            expected = direct()
        assert page.text_content("#raw-text") == expected.text
        assert page.text_content("#det-count") == f"({len(expected.detections)})"
        assert page.evaluate("window.palikit.lastResult.prompt") == expected.prompt
        size = page.evaluate("[document.getElementById('canvas').width, document.getElementById('canvas').height]")
        assert size == [120, 80]  # the uploaded image is drawn at its own size
    assert page.outside == []  # no CDN, no outside requests
    assert page.console_errors == []


def test_playground_draws_boxes_and_masks(page):
    """Render a Result with a box and an RLE mask (a random tiny model rarely emits them) and read
    the canvas pixels back."""
    import numpy as np

    from palikit.tasks.results import mask_to_rle

    mask = np.zeros((80, 120), dtype=bool)
    mask[10:30, 60:100] = True  # rows 10..29, columns 60..99 (box 2)
    mask1 = np.zeros((80, 120), dtype=bool)
    mask1[45:65, 15:45] = True  # inside box 1
    result = {"text": "<loc...> cat", "prompt": "segment cat", "image_size": [120, 80],
              "detections": [{"label": "cat", "box": [10, 40, 50, 70], "score": 0.9,
                              "mask": mask_to_rle(mask1)},
                             {"label": "dog", "box": [60, 10, 100, 30], "score": None,
                              "mask": mask_to_rle(mask, compressed=True)}],
              "errors": [], "timings": {}}
    page.evaluate("r => window.palikit.render(r)", result)
    pixel = """([x, y]) => Array.from(document.getElementById('canvas').getContext('2d').getImageData(x, y, 1, 1).data)"""
    assert page.evaluate(pixel, [10, 55])[:3] == [230, 25, 75]  # left edge of box 1: first palette colour
    masked = page.evaluate(pixel, [80, 20])  # inside box 2 and its mask
    assert page.text_content("#detections").count("(mask)") == 2
    page.evaluate("r => window.palikit.render(r)", {**result, "detections": [{**d, "mask": None} for d in result["detections"]]})
    plain = page.evaluate(pixel, [80, 20])
    green = (60, 180, 75)  # second palette colour, blended at alpha 120/255
    expected = [round(p + (g - p) * 120 / 255) for p, g in zip(plain[:3], green)]
    assert masked[:3] == pytest.approx(expected, abs=3)
    assert "cat" in page.text_content("#detections") and "score 0.900" in page.text_content("#detections")
    # the JS RLE decoders (list and compressed counts) agree with palikit's encoder
    decoded = page.evaluate("r => Array.from(window.palikit.decodeRle(r))", mask_to_rle(mask, compressed=True))
    assert np.array_equal(np.array(decoded, dtype=bool).reshape(80, 120), mask)
    assert page.text_content("#det-count") == "(2)"


def test_playground_shows_server_errors(page, tmp_path):
    status = _run(page, tmp_path, "caption", data=b"not an image at all")
    # issue 15: a file of no allowed format is a 415 that names the allowed formats
    assert status.startswith("Error 415") and "PNG, JPEG" in status
    status = _run(page, tmp_path, "caption", key="wrong-key")
    assert status.startswith("Error 401") and "API key" in status
    status = _run(page, tmp_path, "detect", text="", key=API_KEY)
    assert status.startswith("Error 400")


def test_playground_accepts_a_dropped_image(page):
    data = png_bytes(64, 40, seed=21)
    with one_thread():
        expected = reference_model().ocr(Image.open(io.BytesIO(data)), max_new_tokens=10).text
    page.evaluate("""bytes => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", list(data))
    expect(page.locator("#status")).to_have_text(re.compile(r"^Image loaded: 64x40"))
    page.select_option("#task", "ocr")
    page.fill("#max-new-tokens", "10")
    page.fill("#api-key", API_KEY)
    page.click("#run")
    expect(page.locator("#status")).to_have_text(re.compile(r"^(Done|Error)"), timeout=30000)
    assert page.text_content("#status").startswith("Done")
    assert page.text_content("#raw-text") == expected
