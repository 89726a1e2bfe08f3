"""The bounded image intake without a server: `preprocess.load_image` (format allowlist, pixel and
aspect checks before decoding; what training and eval call), `ImageProcessor.model_ready` (bit-exact
model-size pixels), and the server's `decode_image` (JPEG draft, EXIF-turned source size, the
decoding byte budget and its 429: a 16-bit image costs its bytes, not its pixels; issue 38)."""

from __future__ import annotations

import dataclasses
import io
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from palikit.preprocess import SOURCE_SIZE, ImageError, ImageProcessor, load_image
from palikit.serve.images import DecodeBudget, decode_cost, decode_image
from palikit.serve import ServerSettings
from palikit.serve.errors import ApiError


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM", "SGI"])
def test_load_image_opens_only_the_allowed_formats(fmt, tmp_path):
    data = _enc(Image.new("RGB", (16, 16), 50), fmt)
    assert Image.open(io.BytesIO(data)).size == (16, 16)  # Pillow itself would open it
    with pytest.raises(ImageError, match="PNG, JPEG, WebP, GIF, BMP, TIFF"):
        load_image(data)
    (tmp_path / f"x.{fmt.lower()}").write_bytes(data)
    with pytest.raises(ImageError, match="PNG, JPEG"):
        load_image(tmp_path / f"x.{fmt.lower()}")


def test_eps_is_never_handed_to_pillow_eps_plugin(monkeypatch):
    from PIL import EpsImagePlugin

    called = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: called.append(1))
    with pytest.raises(ImageError, match="not an image format palikit opens"):
        load_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert called == []


def test_extreme_aspect_ratio_refused_before_decoding():
    data = _enc(Image.new("L", (1, 40_000)), "PNG")
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=r"aspect ratio 40000:1 is more than 100:1"):
        load_image(data)
    assert time.perf_counter() - t0 < 0.5
    assert load_image(data, max_aspect=None).size == (1, 40_000)
    assert load_image(_enc(Image.new("L", (100, 1)), "PNG")).size == (100, 1)  # 100:1 is allowed


@pytest.mark.parametrize("style", ["hf", "big_vision"])
def test_model_ready_gives_the_same_pixels_and_keeps_the_source_size(style):
    proc = ImageProcessor(size=32, style=style)
    for w, h in ((90, 60), (300, 47), (32, 32), (20, 10)):
        img = _noise(w, h, seed=w)
        small = proc.model_ready(img)
        assert small.info[SOURCE_SIZE] == (w, h)
        full, sizes_full = proc.preprocess_with_sizes([img])
        ready, sizes_ready = proc.preprocess_with_sizes([small])
        assert sizes_ready == sizes_full == [(w, h)]
        if style == "hf":
            assert small.size == (32, 32)
            assert np.array_equal(full.numpy(), ready.numpy())  # bit-exact
        else:
            assert max(small.size) <= max(w, h) and min(small.size) >= min(min(w, h), 64)
            assert float((full - ready).abs().max()) < 0.25  # box pre-reduction: close, not exact


def test_server_decode_shrinks_to_model_size_with_jpeg_draft_and_exif_turned_size():
    st = ServerSettings()
    proc = ImageProcessor(size=224)
    budget = DecodeBudget(st.decode_budget_bytes)
    img = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")  # compresses well
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_enc(img, "JPEG", exif=exif), st, processor=proc, budget=budget)
    assert out.size == (224, 224) and out.info[SOURCE_SIZE] == (3000, 4000)
    assert budget.peak <= (4000 // 8) * (3000 // 8) * 3 * 4  # decoded at a reduced scale (draft), not 12 MP
    assert budget.used == 0
    png = decode_image(_enc(img, "PNG"), st, processor=proc, budget=budget)
    assert png.size == (224, 224) and png.info[SOURCE_SIZE] == (4000, 3000)
    assert budget.peak == 4000 * 3000 * 3 and budget.used == 0  # RGB: 3 bytes a pixel


def test_decode_budget_admits_within_it_and_answers_429_beyond():
    budget = DecodeBudget(100)
    with budget.hold(150, wait_s=0):  # alone: admitted even above the budget
        with pytest.raises(ApiError) as e:
            with budget.hold(1, wait_s=0.05):
                pass
        assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    with budget.hold(60, wait_s=0):
        with budget.hold(40, wait_s=0):
            assert budget.used == 100
    released = []

    def later():
        time.sleep(0.1)
        released.append(1)

    with budget.hold(90, wait_s=0):
        t = threading.Thread(target=later)
        t.start()
        t.join()
    with budget.hold(90, wait_s=0):  # a waiter gets in once the holder leaves
        waiter_ok = []

        def wait():
            with budget.hold(50, wait_s=2):
                waiter_ok.append(1)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.1)
        assert waiter_ok == []
    t.join()
    assert waiter_ok == [1] and budget.used == 0


def test_a_huge_image_in_training_data_is_a_line_numbered_error(tmp_path):
    import struct
    import zlib

    from palikit.train.collate import Collator
    from palikit.train.data import Example

    side = 12_000  # 144 M pixels > load_image's default limit of 2**27, ~20 KB on disk
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    col = Collator(tokenizer=None, image_processor=ImageProcessor(size=32), config=None)
    with pytest.raises(ValueError, match=r"train\.jsonl:7: cannot read image .*pixels, more than the limit"):
        col.pixels([Example(image=str(path), prefix="caption en", suffix="x", source="train.jsonl:7")])


def _tiff16(side: int) -> bytes:
    ramp = (np.add.outer(np.arange(side), np.arange(side)) * 7 % 65536).astype(np.uint16)
    return _enc(Image.fromarray(ramp), "TIFF", compression="tiff_adobe_deflate")


def test_a_16_bit_image_costs_its_bytes_in_the_decode_budget():
    side = 600
    data, proc = _tiff16(side), ImageProcessor(size=32)
    cost = decode_cost("I;16", (side, side))
    assert cost >= 16 * side * side  # main counted side * side "pixels", as for an 8-bit RGB image
    budget = DecodeBudget(10**12)
    decode_image(data, ServerSettings(), processor=proc, budget=budget)
    assert budget.peak == cost and budget.used == 0
    one = DecodeBudget(cost * 3 // 2)  # room for one such image: a second one at the same time waits
    with one.hold(cost, wait_s=0):
        with pytest.raises(ApiError) as e:
            decode_image(data, dataclasses.replace(ServerSettings(), decode_wait_s=0.05), processor=proc, budget=one)
    assert e.value.status == 429


def test_16_bit_to_8_bit_stays_within_its_budgeted_bytes():
    """The conversion rounds x / 257 in integers (same values as the float64 way, a third of its memory)."""
    side = 1000
    ramp = (np.arange(side * side) % 65536).astype(np.uint16).reshape(side, side)
    img = Image.fromarray(ramp)
    tracemalloc.start()
    out = load_image(img)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(np.asarray(out)[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert peak < 12 * side * side, peak  # numpy's temporaries (main: float64 ones, ~18 bytes a pixel)
