"""palikit: the self-hosted toolkit for Google's PaliGemma and PaliGemma 2.

    import palikit
    pg = palikit.PaliGemma.from_pretrained("google/paligemma2-3b-mix-224")
    result = pg.detect("street.jpg", ["car", "person"])   # boxes in pixels, scores, masks

Names are imported lazily so `import palikit` stays light (no torch until a model is used).
"""

from __future__ import annotations

import importlib
from typing import Any


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata); "0+unknown"
    when palikit runs from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("palikit")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

_LAZY = {
    "PaliGemma": "palikit.api",
    "PaliGemmaConfig": "palikit.config",
    "PRESETS": "palikit.config",
    "get_config": "palikit.weights.resolve",
    "PaliGemmaModel": "palikit.model",
    "build_model": "palikit.model",
    "Engine": "palikit.engine",
    "GenerationOptions": "palikit.engine",
    "SamplingOptions": "palikit.engine",
    "Tokenizer": "palikit.tokenizer",
    "ImageProcessor": "palikit.preprocess",
    "load_image": "palikit.preprocess",
    "Result": "palikit.tasks",
    "Detection": "palikit.tasks",
    "parse_detections": "palikit.tasks",
    "MaskCodec": "palikit.tasks.mask_codec",
    "draw": "palikit.tasks.draw",
    "load_hf_checkpoint": "palikit.weights.hf",
    "load_npz_checkpoint": "palikit.weights.big_vision",
    "save_hub_checkpoint": "palikit.weights.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'palikit' has no attribute {name!r}")
