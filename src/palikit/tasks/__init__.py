"""Task layer: prompt builders, box <-> `<loc>` geometry, output parsing, typed results, COCO RLE, the
mask codec and drawing.

Re-exports the public names. The `mask_codec` names (torch) are imported lazily so that parsing and
prompts stay cheap to import. Drawing lives in the submodule: `from palikit.tasks.draw import draw,
save_png` (re-exporting a function named like its submodule would be shadowed by the submodule).
"""

from __future__ import annotations

from typing import Any

from .boxes import box_iou, decode_loc, encode_box
from .parse import Detection, ParseResult, dedupe, parse_detections
from .prompts import LANGUAGES, answer, caption, describe, detect, ocr, question, segment, suggest_prompt
from .results import Result, mask_to_rle, rle_to_mask

_LAZY = {
    "MaskCodec": "mask_codec", "mask_from_tokens": "mask_codec", "tokens_from_mask": "mask_codec",
    "make_random_codec": "mask_codec", "train_mask_codec": "mask_codec",
}

__all__ = [
    "Detection", "ParseResult", "parse_detections", "dedupe", "box_iou", "encode_box", "decode_loc", "LANGUAGES",
    "caption", "describe", "ocr", "answer", "question", "detect", "segment", "suggest_prompt", "Result", "mask_to_rle", "rle_to_mask", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
