"""Image side of PaliGemma: `load_image` (any input -> RGB PIL image, EXIF-rotated, transparency over
white, 16-bit scaled, every failure an `ImageError`) and `ImageProcessor` (square resize, rescale,
normalize -> `[B, 3, S, S]` float tensor) in two styles: "hf" (bit-exact with transformers'
`SiglipImageProcessor`, PIL backend) and "big_vision" (bilinear antialiased resize, `x/127.5 - 1`).
It also reads and writes `preprocessor_config.json`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

# 2**27 = 134M pixels (~400 MB once decoded to RGB): above any camera or scan a VLM is fed (PaliGemma sees at
# most 896x896), low enough that a hostile PNG/JPEG header can't make a server allocate gigabytes.
DEFAULT_MAX_PIXELS = 2**27
# Longer side / shorter side: beyond it the image is refused before decoding (a 1 x 40,000,000 PNG takes
# seconds to resize and PaliGemma squashes it to a square anyway). Receipts and panoramas stay well below.
DEFAULT_MAX_ASPECT = 100.0
# The formats palikit opens (Pillow is told to try only these: EPS would call Ghostscript, and ICO, PCX,
# TGA, PPM... are attack surface no VLM input needs).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF"
# `Image.info` key: the (width, height) of the original image when the pixels were already shrunk to the
# model's size (`ImageProcessor.model_ready`); boxes are scaled back to this size.
SOURCE_SIZE = "palikit.source_size"

# transformers' PILImageResampling values (preprocessor_config.json "resample")
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in _RESAMPLE.items()}
_STYLES = ("hf", "big_vision")

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, Any]


class ImageError(ValueError):
    """An input that cannot be turned into an RGB image (message says which input and what to do)."""


# ------------------------------------------------------------------------------------------ loading
def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return f"image file {str(x)!r}"
    if isinstance(x, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(x)} bytes)"
    if isinstance(x, np.ndarray) or type(x).__name__ == "Tensor":
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} input"


def load_image(x: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_aspect: float | None = DEFAULT_MAX_ASPECT) -> Image.Image:
    """Any supported input as an RGB `PIL.Image.Image`.

    Accepts a path (str/Path), encoded bytes (or a binary file object), a PIL image, a numpy array
    (HxW, HxWx1/3/4; uint8, uint16, bool, other integers within 0..255, or floats in [0, 1]) or a torch
    tensor (CHW or HWC; a 3-dim tensor whose first dim is 1/3/4 is taken as CHW). EXIF orientation is
    applied; alpha (RGBA/LA/PA, P or L with a transparency key) is composited over white exactly as
    transformers 5.24's `image_transforms.convert_to_rgb` does (`Image.alpha_composite` on a white RGBA
    canvas), so parity with `SiglipImageProcessor` holds for transparent images too; 16-bit images are
    scaled (x/257), not clipped. Encoded inputs are opened only as one of `IMAGE_FORMATS`. `max_pixels`
    (None: no check of ours) refuses images with more pixels than that, and `max_aspect` images whose
    longer side is more than that many times the shorter one, both from the header BEFORE decoding;
    Pillow's own bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, x2) still applies. Every failure raises
    `ImageError` (training and eval report it with the dataset line)."""
    what = _describe(x)
    if isinstance(x, Image.Image):
        img = x
        _check_pixels(img, max_pixels, what, max_aspect)
        try:
            img.load()  # a lazily opened image may still hold undecoded (corrupt/truncated) data
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"The {what} could not be decoded ({type(e).__name__}: {e}); the file it came from "
                             "is probably truncated or corrupt.") from None
    elif isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(x, "read"):
        img = _open(x, what, max_pixels, max_aspect)
    elif isinstance(x, np.ndarray):
        img = _from_array(x, what)
    elif type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        img = _from_array(_tensor_to_hwc(x, what), what)
    else:
        raise ImageError(f"Unsupported image input: {what}. Pass a file path, encoded bytes, a PIL image, a numpy "
                         "array (HxWxC) or a torch tensor (CHW or HWC).")
    source = img
    try:
        if img.getexif().get(0x0112, 1) != 1:  # only then (exif_transpose copies even an upright image)
            img = ImageOps.exif_transpose(img) or img
    except Exception as e:  # noqa: BLE001 - a broken EXIF block should not make the pixels unusable
        warnings.warn(f"Ignoring unreadable EXIF orientation of {what}: {e}", stacklevel=2)
    out = _to_rgb(img, what)
    if isinstance(x, (str, os.PathLike)) and out is not source:
        source.close()  # we opened this file: release its handle now (a caller's file object stays open)
    return out


def _check_pixels(img: Image.Image, max_pixels: int | None, what: str, max_aspect: float | None = None) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"The {what} is empty ({w}x{h} pixels); give a real image.")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"The {what} is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} (guard "
                         "against decompression bombs). Downscale it first, or pass a larger max_pixels.")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise ImageError(f"The {what} is {w}x{h}: its aspect ratio {max(w, h) / min(w, h):.0f}:1 is more than "
                         f"{max_aspect:g}:1 (the model squashes every image to a square). Crop or pad it first, "
                         "or pass a larger max_aspect.")


def _open(x: Any, what: str, max_pixels: int | None, max_aspect: float | None) -> Image.Image:
    if isinstance(x, (str, os.PathLike)):
        path = Path(x).expanduser()
        if str(x).startswith(("http://", "https://")):
            raise ImageError(f"The {what} is a URL; download it first and pass the file path or its bytes.")
        try:
            exists = path.exists()
        except OSError as e:  # e.g. a name too long to be a path (raw data passed as str?)
            raise ImageError(f"The {what[:80]} is not a usable path ({e.strerror}); pass a file path, or the "
                             "file's contents as bytes.") from None
        if not exists:
            raise ImageError(f"The {what} does not exist; check the path.")
        if not path.is_file():
            raise ImageError(f"The {what} is not a file (a folder?); pass an image file.")
        src: Any = path
    elif hasattr(x, "read"):
        src = x
    else:
        if len(x) == 0:
            raise ImageError(f"The {what} is empty; pass the encoded file contents (PNG, JPEG, ...).")
        src = io.BytesIO(bytes(x))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(src, formats=IMAGE_FORMATS)
            try:
                _check_pixels(img, max_pixels, what, max_aspect)
                img.load()  # decode now, so truncated/corrupt data fails here and not later
            except BaseException:
                if isinstance(x, (str, os.PathLike)):
                    img.close()
                raise
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"The {what} is too large to decode safely ({e}). Downscale it first, or raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if you trust it.") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"The {what} is not an image format palikit opens ({FORMAT_NAMES}), or it is corrupt; "
                         "convert it to PNG or JPEG.") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageError(f"The {what} could not be decoded ({type(e).__name__}: {e}); the file is probably "
                         "truncated or corrupt. Re-export or re-download it.") from None
    return img


def _tensor_to_hwc(t: Any, what: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.float()
    arr = t.numpy()
    if arr.ndim == 3:
        if arr.shape[0] in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # CHW (torch's convention wins when both readings fit)
        elif arr.shape[-1] not in (1, 3, 4):
            raise ImageError(f"Can't read the {what} as an image: expected CHW or HWC with 1, 3 or 4 channels.")
    return arr


def _from_array(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] > 4:
        raise ImageError(f"The {what} looks channels-first; numpy images must be HxWxC: use "
                         "arr.transpose(1, 2, 0).")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageError(f"Can't read the {what} as an image: expected HxW, HxWx1, HxWx3 or HxWx4.")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageError(f"The {what} has no pixels.")
    arr = _to_uint8(arr, what)
    return Image.fromarray(np.ascontiguousarray(arr), mode=None)


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255, full range kept
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"The {what} contains NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"The {what} has values in [{lo:.3g}, {hi:.3g}]; float images must be in [0, 1] "
                             "(divide 0..255 data by 255, or pass uint8).")
        return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"The {what} has values in [{lo}, {hi}]; integer images must be uint8 (0..255) or "
                             "uint16 (0..65535).")
        return arr.astype(np.uint8)
    raise ImageError(f"The {what} has an unsupported dtype; use uint8, uint16 or float in [0, 1].")


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)  # 16-bit grey (I;16*) or 32-bit int holding 16-bit data ("I", older PNG decoding)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"The {what} is a 32-bit integer image with values outside 0..65535; convert it "
                             "to 8 or 16 bits first.")
        # round(x / 257) in integers, (x + 128) // 257 (no ties for integer x): 4 bytes a pixel, not float64's 8 x 3
        img = Image.fromarray(((arr.astype(np.uint32) + 128) // 257).astype(np.uint8), mode="L")
    elif mode == "F":
        img = Image.fromarray(_to_uint8(np.asarray(img), what), mode="L")
    # same rule as transformers' convert_to_rgb: alpha band or a transparency key -> composite over white
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# ------------------------------------------------------------------------------------------ processor
@dataclass
class ImageProcessor:
    """Square-resize + rescale + normalize, as PaliGemma expects (`[B, 3, size, size]` float32).

    style "hf": transformers' `SiglipImageProcessor` (PIL backend): PIL resize of the uint8 image to
    (size, size) with `resample` (default bicubic) -> x * rescale_factor -> (x - mean) / std. PIL's resize
    always filters over the source area, so `antialias` does not apply. Bit-exact with transformers 5.24.
    style "big_vision": torch bilinear (default) resize of the float image with `antialias`, then
    `x / 127.5 - 1` (big_vision's `resize` + `value_range(-1, 1)`; close to TF, not bit-exact). Bicubic
    may overshoot [-1, 1] slightly; big_vision does not clip either.

    `do_convert_rgb` is kept only for round-tripping the config: images are always made RGB."""

    size: int = 224
    resample: str | None = None  # None: "bicubic" for style "hf", "bilinear" for "big_vision"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    antialias: bool = True
    style: str = "hf"
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool | None = None
    patch_size: int = 14  # only for image_seq_length in the written config
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS)

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int (the square side in pixels), got {self.size!r}")
        if self.style not in _STYLES:
            raise ValueError(f"style must be one of {_STYLES}, got {self.style!r}")
        if self.resample is None:
            self.resample = "bicubic" if self.style == "hf" else "bilinear"
        if isinstance(self.resample, int) and not isinstance(self.resample, bool):
            if self.resample not in _RESAMPLE_NAMES:
                raise ValueError(f"resample {self.resample} is not a PIL resampling filter (0..5)")
            self.resample = _RESAMPLE_NAMES[self.resample]
        allowed = tuple(_RESAMPLE) if self.style == "hf" else ("bilinear", "bicubic", "nearest")
        if self.resample not in allowed:
            raise ValueError(f"resample {self.resample!r} is not supported for style {self.style!r}; use one of "
                             f"{allowed}")
        self.image_mean = _triple(self.image_mean, "image_mean")
        self.image_std = _triple(self.image_std, "image_std")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    # ---------------------------------------------------------------------------------- config io
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, default_size: int | None = None, **overrides: Any
                        ) -> ImageProcessor:
        """Read `folder/preprocessor_config.json` (or that file itself) when present; otherwise defaults with
        `default_size` (an error when neither gives a size)."""
        path = Path(folder).expanduser()
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            if default_size is None:
                raise FileNotFoundError(f"No preprocessor_config.json at {path} and no default_size given; pass "
                                        "default_size=<model image size>.")
            return cls(size=default_size, **overrides)
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it.") from None
        return cls.from_dict(cfg, default_size=default_size, **overrides)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], default_size: int | None = None, **overrides: Any) -> ImageProcessor:
        """From a preprocessor_config.json dict (unknown keys ignored)."""
        size = cfg.get("size")
        if isinstance(size, dict):
            h, w = size.get("height"), size.get("width")
            if h is None or w is None or h != w:
                raise ValueError(f"preprocessor_config size {size} is not a square {{'height': S, 'width': S}}; "
                                 "PaliGemma needs a square input.")
            side = int(h)
        elif isinstance(size, int):
            side = size
        elif size is None and default_size is not None:
            side = default_size
        else:
            raise ValueError(f"preprocessor_config has no usable size ({size!r}); add size {{'height', 'width'}}.")
        kw: dict[str, Any] = {"size": side}
        for key in ("resample", "rescale_factor", "image_mean", "image_std", "do_resize", "do_rescale",
                    "do_normalize", "do_convert_rgb"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        if cfg.get("palikit_style") is not None:
            kw["style"] = cfg["palikit_style"]
        if cfg.get("palikit_antialias") is not None:
            kw["antialias"] = bool(cfg["palikit_antialias"])
        if "image_seq_length" in cfg and cfg["image_seq_length"]:
            n = int(cfg["image_seq_length"])
            grid = round(n**0.5)
            if grid * grid == n and side % grid == 0:
                kw["patch_size"] = side // grid
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A preprocessor_config.json that transformers (SiglipImageProcessor / PaliGemmaProcessor) reads."""
        out: dict[str, Any] = {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "PaliGemmaProcessor",
            "size": {"height": self.size, "width": self.size},
            "resample": _RESAMPLE[str(self.resample)],
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
            "image_seq_length": (self.size // self.patch_size) ** 2,
        }
        if self.style != "hf":  # ignored by transformers; lets palikit reload the same style
            out["palikit_style"] = self.style
            out["palikit_antialias"] = self.antialias
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/preprocessor_config.json`; returns its path."""
        path = Path(folder) / "preprocessor_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    # ---------------------------------------------------------------------------------- processing
    def __call__(self, images: ImageInput | list[ImageInput]) -> Any:
        """`[B, 3, size, size]` float32 tensor for one image, a list of images, or a 4-dim batch array."""
        return self.preprocess_with_sizes(images)[0]

    def preprocess_with_sizes(self, images: ImageInput | list[ImageInput]) -> tuple[Any, list[tuple[int, int]]]:
        """(pixel_values `[B, 3, S, S]`, original (width, height) of each image after EXIF rotation: the
        size boxes are scaled back to). An image `model_ready` made is already loaded (RGB, upright,
        checked: the server's intake loaded it) and is not loaded again."""
        import torch

        if isinstance(images, (list, tuple)):
            items = list(images)
        elif getattr(images, "ndim", None) == 4:  # a batch array / tensor [B, H, W, C] or [B, C, H, W]
            items = list(images)
        else:
            items = [images]
        if not items:
            raise ValueError("No images given; pass one image or a non-empty list.")
        arrays, sizes = [], []
        for x in items:
            ready = isinstance(x, Image.Image) and x.mode == "RGB" and SOURCE_SIZE in x.info
            img = x if ready else load_image(x, max_pixels=self.max_pixels)
            sizes.append(tuple(img.info.get(SOURCE_SIZE, img.size)))
            arrays.append(self._process(img))
        return torch.from_numpy(np.stack(arrays)), sizes

    def model_ready(self, img: Image.Image) -> Image.Image:
        """A small RGB image that this processor turns into the same pixels as `img` (the server keeps
        only this while a request waits; `info[SOURCE_SIZE]` keeps the original size for the boxes).
        Style "hf": `img` resized to S x S exactly as `_process` would (bit-exact). Style "big_vision"
        (torch resize, not PIL): `img` itself when no side exceeds 2S, else box-reduced by an integer
        factor per axis to sides >= 2S (close to, not bit-exact with, resizing the full image)."""
        size = tuple(img.info.get(SOURCE_SIZE, img.size))
        S = self.size
        if not self.do_resize or img.size == (S, S):
            out = img
        elif self.style == "hf":
            out = img.resize((S, S), resample=_RESAMPLE[str(self.resample)])
        else:
            fx, fy = max(1, img.size[0] // (2 * S)), max(1, img.size[1] // (2 * S))
            out = img.reduce((fx, fy)) if fx > 1 or fy > 1 else img
        if out is img:
            out = img.copy()
        out.info = {SOURCE_SIZE: size}
        return out

    def _process(self, img: Image.Image) -> np.ndarray:
        S = self.size
        if not self.do_resize and img.size != (S, S):
            raise ImageError(f"do_resize is off but an image is {img.size[0]}x{img.size[1]}, not {S}x{S}; resize "
                             "it first or enable do_resize.")
        if self.style == "big_vision":
            return self._process_big_vision(img)
        if self.do_resize and img.size != (S, S):
            img = img.resize((S, S), resample=_RESAMPLE[str(self.resample)])
        x = np.asarray(img).transpose(2, 0, 1)  # CHW uint8
        # transformers: rescale in float64 then cast to float32; normalize in float32
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.array(self.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)

    def _process_big_vision(self, img: Image.Image) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        S = self.size
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
        if self.do_resize and img.size != (S, S):
            mode = str(self.resample)
            aa = self.antialias and mode != "nearest"
            x = F.interpolate(x, size=(S, S), mode=mode, antialias=aa,
                              **({} if mode == "nearest" else {"align_corners": False}))
        x = x / 127.5 - 1.0
        return x[0].numpy().astype(np.float32)


def _triple(v: Any, name: str) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    t = tuple(float(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {v!r}")
    return t  # type: ignore[return-value]


__all__ = ["DEFAULT_MAX_ASPECT", "DEFAULT_MAX_PIXELS", "FORMAT_NAMES", "IMAGE_FORMATS", "ImageError", "ImageProcessor",
           "SOURCE_SIZE", "load_image"]
