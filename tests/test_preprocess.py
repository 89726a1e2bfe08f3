"""palikit.preprocess: parity with transformers' SiglipImageProcessor, config round-trips, every input
kind, EXIF / alpha / 16-bit handling, and the ImageError matrix."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from palikit.preprocess import ImageError, ImageProcessor, load_image

RNG = np.random.default_rng(0)
SHAPES = [(37, 53), (224, 224), (301, 97), (13, 480), (500, 333)]  # (height, width), odd sizes and aspects


def _random_images() -> list[Image.Image]:
    return [Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SHAPES]


IMAGES = _random_images()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _hf_siglip(**kw):
    import warnings

    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SiglipImageProcessorPil(**kw)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("size", [224, 56])
def test_pixel_values_equal_transformers_siglip(size):
    ours = ImageProcessor(size=size)(IMAGES)
    ref = _hf_siglip(size={"height": size, "width": size})(IMAGES, return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (len(IMAGES), 3, size, size)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_auto_image_processor_picks_the_pil_backend_we_match(tmp_path):
    import warnings

    from transformers import AutoImageProcessor

    ImageProcessor(size=28).save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoImageProcessor.from_pretrained(tmp_path)
    assert hf.backend == "pil"  # no torchvision here; the torchvision backend differs by +-1 grey level
    assert hf.size["height"] == hf.size["width"] == 28 and hf.resample == 3
    ref = hf(IMAGES[:2], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageProcessor(size=28)(IMAGES[:2]), ref, atol=1e-6, rtol=0)


def test_transparent_image_matches_transformers():
    arr = RNG.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    img = Image.fromarray(arr, mode="RGBA")
    ref = _hf_siglip(size={"height": 32, "width": 32})([img], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageProcessor(size=32)(img), ref, atol=1e-6, rtol=0)


def test_reads_config_written_by_transformers(tmp_path):
    hf = _hf_siglip(size={"height": 448, "width": 448}, resample=2, image_mean=[0.1, 0.2, 0.3],
                    image_std=[0.5, 0.6, 0.7])
    hf.save_pretrained(tmp_path)
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert (proc.size, proc.resample, proc.image_mean, proc.image_std) == (448, "bilinear", (0.1, 0.2, 0.3),
                                                                           (0.5, 0.6, 0.7))
    small = _hf_siglip(size={"height": 40, "width": 40}, resample=2, image_mean=[0.1, 0.2, 0.3],
                       image_std=[0.5, 0.6, 0.7])
    small.save_pretrained(tmp_path / "s")
    ref = small(IMAGES[:2], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImageProcessor.from_pretrained(tmp_path / "s")(IMAGES[:2]), ref, atol=1e-6, rtol=0)


def test_save_round_trips_and_defaults(tmp_path):
    proc = ImageProcessor(size=448, style="big_vision", antialias=False)
    proc.save(tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert cfg["size"] == {"height": 448, "width": 448} and cfg["image_seq_length"] == 1024
    assert cfg["resample"] == 2 and cfg["image_processor_type"] == "SiglipImageProcessor"
    assert ImageProcessor.from_pretrained(tmp_path) == proc
    assert ImageProcessor.from_pretrained(tmp_path / "missing", default_size=896).size == 896
    with pytest.raises(FileNotFoundError, match="default_size"):
        ImageProcessor.from_pretrained(tmp_path / "missing")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "preprocessor_config.json").write_text('{"size": {"height": 10, "width": 20}}')
    with pytest.raises(ValueError, match="square"):
        ImageProcessor.from_pretrained(tmp_path / "r")


@pytest.mark.parametrize("kwargs, match", [({"size": 0}, "size"), ({"style": "tf"}, "style"),
                                           ({"resample": "cubic"}, "resample"), ({"image_std": (1, 0, 1)}, "std"),
                                           ({"image_mean": (0.5, 0.5)}, "3 values")])
def test_bad_settings_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessor(**kwargs)


def test_big_vision_style_range_and_shape():
    proc = ImageProcessor(size=64, style="big_vision")
    assert proc.resample == "bilinear"
    pv, sizes = proc.preprocess_with_sizes(IMAGES)
    assert pv.shape == (len(IMAGES), 3, 64, 64) and pv.dtype == torch.float32
    assert pv.min() >= -1.0 and pv.max() <= 1.0
    assert sizes == [(w, h) for h, w in SHAPES]
    flat = Image.new("RGB", (90, 30), (255, 0, 127))  # constant image: exactly x/127.5 - 1
    expected = torch.tensor([1.0, -1.0, 127 / 127.5 - 1]).view(3, 1, 1).expand(3, 64, 64)
    torch.testing.assert_close(proc(flat)[0], expected, atol=1e-6, rtol=0)
    # the two styles differ (bilinear vs bicubic, float vs uint8 resize) but only slightly
    diff = (proc(IMAGES[4]) - ImageProcessor(size=64)(IMAGES[4])).abs()
    assert 0 < diff.mean() < 0.2


# ------------------------------------------------------------------------------------------ input kinds
def test_every_input_kind_gives_the_same_pixels(tmp_path):
    img = IMAGES[0]
    arr = np.array(img)
    path = tmp_path / "x.png"
    img.save(path)
    inputs = {
        "str path": str(path), "Path": path, "bytes": _png_bytes(img), "bytearray": bytearray(_png_bytes(img)),
        "file object": io.BytesIO(_png_bytes(img)), "PIL": img, "uint8 HWC": arr,
        "float HWC": arr / 255.0, "uint16 HWC": arr.astype(np.uint16) * 257,
        "torch CHW uint8": torch.from_numpy(arr).permute(2, 0, 1), "torch HWC uint8": torch.from_numpy(arr),
        "torch CHW float": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
    }
    proc = ImageProcessor(size=32)
    expected = proc(img)
    for name, x in inputs.items():
        out = load_image(x)
        if name == "file object":
            x.seek(0)
        assert out.mode == "RGB" and out.size == img.size, name
        torch.testing.assert_close(proc(x), expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1)])
def test_grayscale_arrays_become_rgb(shape):
    arr = RNG.integers(0, 256, shape, dtype=np.uint8)
    out = np.asarray(load_image(arr))
    assert out.shape == (20, 30, 3)
    assert (out == arr.reshape(20, 30, 1)).all()


def test_exif_rotated_jpeg_has_the_rotated_size():
    img = Image.fromarray(RNG.integers(0, 256, (40, 100, 3), dtype=np.uint8))  # 100 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (40, 100)
    _, sizes = ImageProcessor(size=28).preprocess_with_sizes([buf.getvalue(), img])
    assert sizes == [(40, 100), (100, 40)]


def test_rgba_and_palette_transparency_composite_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # opaque red-ish pixel; the rest fully transparent
    rgba[1, 1, 3] = 128
    out = np.asarray(load_image(rgba))
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[3, 3]) == (255, 255, 255)
    expected = np.array([200, 0, 0]) * 128 / 255 + 255 * 127 / 255  # half-transparent over white
    assert np.abs(out[1, 1] - expected).max() <= 1.0  # PIL's integer blend
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    assert tuple(np.asarray(load_image(pal))[0, 0]) == (255, 255, 255)
    la = Image.new("LA", (2, 2), (50, 0))
    assert tuple(np.asarray(load_image(la))[0, 0]) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(path))[..., 0].astype(int)
    assert out.max() == 255 and out.min() == 0  # clipping would make most of the ramp 255
    np.testing.assert_array_equal(out, np.round(ramp / 257).astype(int))
    assert len(np.unique(out)) == 64


# ------------------------------------------------------------------------------------------ errors
def _truncated_png() -> bytes:
    data = _png_bytes(IMAGES[4])
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (tiny on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                       b"")


ERROR_CASES = {
    "corrupt bytes": (lambda p: b"\x89PNG\r\n\x1a\n not really a png", "not an image format"),
    "truncated png": (lambda p: _truncated_png(), "truncated or corrupt"),
    "lazy truncated PIL": (lambda p: Image.open(io.BytesIO(_truncated_png())), "truncated or corrupt"),
    "text file": (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "not an image format"),
    "missing path": (lambda p: p / "nope.png", "does not exist"),
    "folder": (lambda p: p, "not a file"),
    "empty bytes": (lambda p: b"", "empty"),
    "url": (lambda p: "https://example.com/cat.png", "download it first"),
    "bad array shape": (lambda p: np.zeros((4, 5, 2), dtype=np.uint8), "HxW, HxWx1, HxWx3 or HxWx4"),
    "channels-first numpy": (lambda p: np.zeros((3, 20, 30), dtype=np.uint8), "transpose"),
    "4-d array": (lambda p: np.zeros((1, 4, 4, 3), dtype=np.uint8), "expected HxW"),
    "float out of range": (lambda p: np.full((4, 4, 3), 255.0), r"must be in \[0, 1\]"),
    "NaN": (lambda p: np.full((4, 4), np.nan), "NaN"),
    "int out of range": (lambda p: np.full((4, 4), 300, dtype=np.int32), "uint8"),
    "bad tensor shape": (lambda p: torch.zeros(5, 6, 7), "CHW or HWC"),
    "unsupported type": (lambda p: 42, "Unsupported image input"),
    "decompression bomb": (lambda p: _bomb_png(), "too large"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_inputs_raise_image_error(case, tmp_path):
    make, match = ERROR_CASES[case]
    with pytest.raises(ImageError, match=match) as info:
        load_image(make(tmp_path))
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None  # no raw PIL traceback chained in


def test_max_pixels_guard_is_configurable(tmp_path):
    path = tmp_path / "a.png"
    IMAGES[0].save(path)
    with pytest.raises(ImageError, match="more than the limit of 1000"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageError, match="limit"):
        ImageProcessor(size=28, max_pixels=1000)(IMAGES[0])
    assert load_image(path, max_pixels=None).size == (53, 37)


def test_processor_errors():
    with pytest.raises(ValueError, match="No images"):
        ImageProcessor(size=28)([])
    with pytest.raises(ImageError, match="do_resize is off"):
        ImageProcessor(size=28, do_resize=False)(IMAGES[0])
    assert ImageProcessor(size=224, do_resize=False)(IMAGES[1]).shape == (1, 3, 224, 224)


def test_batch_arrays_and_long_strings():
    batch = np.stack([np.asarray(IMAGES[1])] * 2)
    pv, sizes = ImageProcessor(size=28).preprocess_with_sizes(batch)
    assert pv.shape == (2, 3, 28, 28) and sizes == [(224, 224)] * 2
    chw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    torch.testing.assert_close(ImageProcessor(size=28)(chw), pv, atol=0, rtol=0)
    with pytest.raises(ImageError, match="not a usable path"):
        load_image("x" * 5000)
