"""Client images for the server: `image_bytes_from_string` (base64 / data URL; paths and URLs are
refused, the server never opens what a client names) and `decode_image` (size and pixel limits checked
from the header BEFORE decoding, corrupt files answered as 400)."""

from __future__ import annotations

import base64
import binascii
import io
import re

from .schemas import ApiError, ServerSettings, bad_request

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


def decode_image(data: bytes, settings: ServerSettings, param: str = "image"):
    """Bytes -> RGB PIL image, refusing oversized files and decompression bombs BEFORE decoding
    (the pixel count comes from the header)."""
    from PIL import Image

    if not data:
        raise bad_request("image is empty (0 bytes).", param)
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "payload_too_large",
                       f"image is {len(data)} bytes; this server accepts at most {settings.max_upload_bytes}.",
                       param=param)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"image has too many pixels; this server accepts at most "
                       f"{settings.max_image_pixels} (width x height).", param=param) from None
    except Exception:  # noqa: BLE001 - anything PIL cannot identify
        raise ApiError(400, "invalid_image", "could not read the image: not a supported image format "
                       "(PNG, JPEG, WebP, GIF, BMP, TIFF) or the file is corrupt.", param=param) from None
    if w * h > settings.max_image_pixels:
        raise ApiError(413, "image_too_large", f"image is {w}x{h} = {w * h} pixels; this server accepts at most "
                       f"{settings.max_image_pixels} pixels (width x height).", param=param)
    if w < 1 or h < 1:
        raise ApiError(400, "invalid_image", f"image has no pixels ({w}x{h}).", param=param)
    from ..preprocess import load_image

    try:
        return load_image(data, max_pixels=settings.max_image_pixels)
    except Exception:  # noqa: BLE001 - ImageError (truncated / corrupt data) or anything Pillow raises
        raise ApiError(400, "invalid_image", "could not decode the image: the file is truncated or corrupt.",
                       param=param) from None
