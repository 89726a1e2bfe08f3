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
from serve_helpers import API_KEY, CHROMIUM, one_thread, png_bytes, reference_model
from serve_helpers import CHROMIUM_FLAGS as FLAGS
from serve_helpers import server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # a real server process and chromium



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


def _canvas_size(page) -> dict:
    return page.evaluate("""() => { const c = document.getElementById('canvas');
        return {canvas: [c.width, c.height], shown: [c.clientWidth, c.clientHeight], scale: window.palikit.view().scale}; }""")


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
        # a small upload is shown a whole number of times larger: shorter side 80 -> 6x = 480 >= 448 px,
        # on screen (CSS pixels) and in the canvas's own pixels (one per CSS pixel at devicePixelRatio 1)
        assert _canvas_size(page) == {"canvas": [720, 480], "shown": [720, 480], "scale": 6}
    assert page.outside == []  # no CDN, no outside requests
    assert page.console_errors == []


def test_playground_draws_boxes_and_masks(page):
    """Render a Result with a box and an RLE mask (a random tiny model rarely emits them) and read
    the canvas pixels back."""
    import numpy as np

    from palikit.tasks.rle import mask_to_rle

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
    k = page.evaluate("window.palikit.view().scale")  # image pixels -> canvas pixels (1 when no upload yet)
    pixel = """([x, y]) => Array.from(document.getElementById('canvas').getContext('2d').getImageData(x, y, 1, 1).data)"""
    assert page.evaluate(pixel, [10 * k, 55 * k])[:3] == [230, 25, 75]  # left edge of box 1: first palette colour
    masked = page.evaluate(pixel, [80 * k, 20 * k])  # inside box 2 and its mask
    assert page.text_content("#detections").count("(mask)") == 2
    page.evaluate("r => window.palikit.render(r)", {**result, "detections": [{**d, "mask": None} for d in result["detections"]]})
    plain = page.evaluate(pixel, [80 * k, 20 * k])
    green = (60, 180, 75)  # second palette colour, blended at alpha 120/255
    expected = [round(p + (g - p) * 120 / 255) for p, g in zip(plain[:3], green)]
    assert masked[:3] == pytest.approx(expected, abs=3)
    assert "cat" in page.text_content("#detections") and "score 0.900" in page.text_content("#detections")
    # the JS RLE decoders (list and compressed counts) agree with palikit's encoder
    decoded = page.evaluate("r => Array.from(window.palikit.decodeRle(r))", mask_to_rle(mask, compressed=True))
    assert np.array_equal(np.array(decoded, dtype=bool).reshape(80, 120), mask)
    assert page.text_content("#det-count") == "(2)"


def test_a_small_image_is_shown_enlarged_with_legible_labels(page, tmp_path):
    """A 112 px demo image is shown at 448 px (4x, crisp pixels), on screen and in canvas pixels; its
    boxes land at 4x their coordinates and each label is a filled patch of the box colour holding
    text pixels at least 14 px tall. The screenshot is kept next to the test's files."""
    import numpy as np

    from palikit.demo.shapes import make_sample
    from palikit.tasks.rle import mask_to_rle

    sample = make_sample(0, seed=2_000_003, size=112)
    path = tmp_path / "shapes.png"
    sample.image.save(path)
    page.set_input_files("#file", str(path))
    expect(page.locator("#status")).to_have_text(re.compile(r"^Image loaded: 112x112"))
    assert _canvas_size(page) == {"canvas": [448, 448], "shown": [448, 448], "scale": 4}
    dets = [{"label": s.cls, "box": list(s.box), "score": 0.9, "mask": mask_to_rle(s.mask)} for s in sample.shapes]
    page.evaluate("r => window.palikit.render(r)", {"text": "", "prompt": "segment", "image_size": [112, 112],
                                                    "detections": dets, "errors": [], "timings": {}})
    shot = Image.open(io.BytesIO(page.locator("#canvas").screenshot(path=str(tmp_path / "playground-canvas.png"))))
    assert min(shot.size) >= 448  # what the user sees: the canvas and its 1 px border
    pixels = np.array(page.evaluate("""() => Array.from(document.getElementById('canvas').getContext('2d')
        .getImageData(0, 0, 448, 448).data)"""), dtype=np.uint8).reshape(448, 448, 4)[..., :3]
    palette = [(230, 25, 75), (60, 180, 75)]  # the playground's first two colours (#e6194b, #3cb44b)
    for shape, color in zip(sample.shapes, palette):
        x0, y0, x1, y1 = (int(v * 4) for v in shape.box)
        assert (pixels[y1 - 1, x0 + 8: x1 - 8] == color).all()  # bottom edge at 4x the box
        band = pixels[max(y0 - 30, 0): y0 + 30, x0: x0 + 100]  # the label: above the box or just inside
        patch = (band == color).all(axis=-1)
        rows = np.nonzero(patch.sum(axis=1) > 40)[0]
        assert rows.size and rows.max() - rows.min() + 1 >= 14, f"label patch of {shape.cls} too small"
        text = band[rows.min(): rows.max() + 1]
        ink = (text.min(axis=-1) > 200) | (text.max(axis=-1) < 60)  # white or black letters
        assert ink.sum() > 30, f"no label text for {shape.cls}"


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
