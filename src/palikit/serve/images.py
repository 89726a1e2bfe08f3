"""Client images for the server: `image_bytes_from_string` (base64 / data URL; paths and URLs are
refused, the server never opens what a client names) and `decode_image`, the bounded intake:

- only `IMAGE_FORMATS` are opened (PNG, JPEG, WebP, GIF, BMP, TIFF; Pillow is told to try no other
  plugin, so EPS/Ghostscript, ICO, PCX, TGA, PPM... are never parsed): anything else is a 415 naming them;
- file size, pixel count and aspect ratio are checked from the header BEFORE decoding (413 / 400);
- JPEGs decode at a reduced scale (Pillow's draft mode: DCT scaling to 1/2..1/8, never below the
  model's size); other formats are decoded whole, within the global `DecodeBudget`;
- the decoded image is converted to what the model needs (`ImageProcessor.model_ready`: S x S for
  the "hf" style) right there, in the request's worker thread, so the model thread never resizes and
  a waiting request holds only model-size pixels (the original size rides along for the boxes);
- `DecodeBudget`: the bytes that decoding holds at its peak, across all requests (`decode_cost`: a
  16-bit, float or transparent image costs several times an RGB one of the same size, its own
  pixels plus the conversions to RGB); beyond it a request waits up to `decode_wait_s`, then gets
  429 with Retry-After.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
from contextlib import contextmanager, nullcontext

from .errors import ApiError, bad_request
from .schemas import ServerSettings

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,", re.IGNORECASE)


_PATHLIKE = re.compile(r"^(~|\.{1,2}[/\\]|/(?!9j/)|[A-Za-z]:[/\\]|\\\\)")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def image_bytes_from_string(value: str, settings: ServerSettings, param: str = "image") -> bytes:
    """Base64 or a data URL -> bytes. URLs and paths are refused with a message saying what to send."""
    if not isinstance(value, str) or not value.strip():
        raise bad_request("image is empty: send the image bytes as a multipart upload, base64 or a data URL.", param)
    s = value.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://")):
        raise ApiError(400, "unsupported_image_source",
                       "image URLs are not fetched by this server (it makes no outbound requests); send the image "
                       "bytes as a multipart upload, base64, or a data URL (data:image/png;base64,...).", param=param)
    if len(s) < 4096 and (_PATHLIKE.match(s) or s.lower().endswith(_IMAGE_SUFFIXES)):
        raise ApiError(400, "unsupported_image_source",
                       "image looks like a file path or name; this server never reads files. Upload the file "
                       "(multipart field 'image') or send its bytes as base64 or a data URL.", param=param)
    m = _DATA_URL.match(s)
    if m:
        if not m.group("b64"):
            raise bad_request("the data URL is not base64-encoded; use data:image/png;base64,....", param)
        s = s[m.end():]
    elif s.startswith("data:"):
        raise bad_request("malformed data URL; expected data:image/png;base64,<base64 bytes>.", param)
    if len(s) > settings.max_upload_bytes * 4 // 3 + 8:
        raise ApiError(413, "payload_too_large",
                       f"image is larger than this server's limit of {settings.max_upload_bytes} bytes.", param=param)
    s = re.sub(r"\s+", "", s)
    try:
        data = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_" if ("-" in s or "_" in s) else None,
                                validate=True)
    except (binascii.Error, ValueError):
        hint = (" The server never reads files by path." if ("/" in s[:200] and "." in s[-6:]) or s.startswith("~")
                else "")
        raise bad_request("image is not valid base64 (or a data URL)." + hint, param) from None
    return data


_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


def _looks_supported(data: bytes) -> bool:
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


# bytes per pixel at the peak of decoding + conversion to RGB (preprocess._to_rgb), by Pillow mode:
# the decoded image, its conversion intermediates, and the RGB result
_RGB = 3
_ALPHA = 4 + 4 + 4 + _RGB  # RGBA copy, white canvas, composite, RGB
_PEAK_BYTES = {"1": 1 + _RGB, "L": 1 + _RGB, "P": 1 + _RGB, "RGB": _RGB, "YCbCr": 3 + _RGB, "LAB": 3 + _RGB,
               "HSV": 3 + _RGB, "CMYK": 4 + _RGB, "LA": 2 + _ALPHA, "La": 2 + _ALPHA, "PA": 2 + _ALPHA,
               "RGBA": 4 + _ALPHA, "RGBa": 4 + _ALPHA,
               "I;16": 2 + 2 + 4 + 4 + 1 + _RGB,  # array copy, uint32 rounding (two temporaries), L, RGB
               "I": 4 + 4 + 4 + 4 + 1 + _RGB, "F": 4 + 8 + 8 + 8 + 1 + _RGB}  # float64 scaling in _to_uint8


def decode_cost(mode: str, size: tuple[int, int], transparency: bool = False) -> int:
    """Bytes that decoding an image of this Pillow `mode` and `size` holds at its peak (the budget's
    unit); an unknown mode counts as the costliest."""
    per_pixel = _PEAK_BYTES.get("I;16" if mode.startswith("I;16") else mode, max(_PEAK_BYTES.values()))
    if transparency and mode in ("1", "L", "P", "RGB"):  # a transparency key: composited like an alpha band
        per_pixel += _ALPHA
    return size[0] * size[1] * per_pixel


class DecodeBudget:
    """Bytes held by image decoding across the server (`decode_cost`). A request is admitted when the
    budget has room for it, or when nothing else is decoding (so one image at the limits always gets
    through)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int, wait_s: float):
        with self._cond:
            if not self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.total, timeout=wait_s):
                raise ApiError(429, "busy", f"the server is decoding other large images ({self.used >> 20} MB in "
                               f"flight, budget {self.total >> 20} MB); retry shortly, or send a smaller image.",
                               headers={"Retry-After": "1"})
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _probe(data: bytes, settings: ServerSettings, param: str):
    from PIL import Image

    from ..preprocess import FORMAT_NAMES, IMAGE_FORMATS

    try:
        probe = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"image has too many pixels; this server accepts at most "
                       f"{settings.max_image_pixels} (width x height).", param=param) from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify among the allowed formats
        if _looks_supported(data):
            raise ApiError(400, "invalid_image", "could not read the image: the file is corrupt or not a supported "
                           f"image format ({FORMAT_NAMES}).", param=param) from None
        raise ApiError(415, "unsupported_image_format", f"not a supported image format: send {FORMAT_NAMES} "
                       "(convert other formats first).", param=param) from None
    w, h = probe.size
    if w < 1 or h < 1:
        raise ApiError(400, "invalid_image", f"image has no pixels ({w}x{h}).", param=param)
    if w * h > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; this server accepts at most "
                       f"{settings.max_image_pixels} pixels (width x height): downscale it.", param=param)
    ratio = max(w, h) / min(w, h)
    if ratio > settings.max_aspect_ratio:
        raise ApiError(400, "invalid_image", f"image is {w}x{h}: aspect ratio {ratio:.0f}:1 is more than this "
                       f"server's {settings.max_aspect_ratio:g}:1; crop it or pad it towards a square.", param=param)
    return probe


def decode_image(data: bytes, settings: ServerSettings, param: str = "image", *, processor=None,
                 budget: DecodeBudget | None = None):
    """Bytes -> RGB PIL image ready for the model (see the module docstring); every refusal an ApiError.
    Without a processor the full-size RGB image is returned."""
    from ..preprocess import load_image

    if not data:
        raise bad_request("image is empty (0 bytes).", param)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large",
                       f"image is {len(data)} bytes; this server accepts at most {settings.max_upload_bytes}.",
                       param=param)
    with _probe(data, settings, param) as probe:
        header = probe.size
        if processor is not None and probe.format == "JPEG" and processor.do_resize:
            probe.draft("RGB", (processor.size, processor.size))  # decode at 1/2..1/8 scale, still >= S
        cost = decode_cost(probe.mode, probe.size, probe.info.get("transparency") is not None)
        with budget.hold(cost, settings.decode_wait_s) if budget is not None else nullcontext():
            try:
                img = load_image(probe, max_pixels=settings.max_image_pixels, max_aspect=None)
            except Exception:  # noqa: BLE001 - ImageError (truncated / corrupt data) or anything Pillow raises
                raise ApiError(400, "invalid_image", "could not decode the image: the file is truncated or corrupt.",
                               param=param) from None
            if processor is None:
                return img.copy() if img is probe else img  # the probe is closed on leaving
            from ..preprocess import SOURCE_SIZE

            # the size the user sees (boxes are scaled to it): the header's, turned when EXIF rotated it
            turned = img.size != probe.size and img.size == probe.size[::-1]
            img.info[SOURCE_SIZE] = header[::-1] if turned else header
            return processor.model_ready(img)
