"""Task layer: the task table (`registry.py`: every task's prompt, arguments, surfaces and eval spec),
the label rule and singular/plural (`labels.py`), the one options type (`options.py`), prompt
builders, box <-> `<loc>` geometry, output parsing (from token ids or from text), typed results, the
shared prediction record (`records.py`), COCO RLE, the mask codec and drawing.

Re-exports the public names. The `mask_codec` names (torch) are imported lazily so that parsing and
prompts stay cheap to import. Drawing lives in the submodule: `from palikit.tasks.draw import draw,
save_png` (re-exporting a function named like its submodule would be shadowed by the submodule).
"""

from __future__ import annotations

from typing import Any

from .boxes import box_iou, decode_loc, encode_box
from .labels import clean_labels, plural, singular, split_labels
from .options import PredictOptions
from .parse import Detection, ParseResult, dedupe, detections_from_ids, parse_detections
from .prompts import LANGUAGES, answer, caption, describe, detect, ocr, question, segment, suggest_prompt
from .records import PredictionRecord
from .registry import TASKS, Task, get_task, register
from .results import Result
from .rle import mask_to_rle, rle_to_mask

_LAZY = {
    "MaskCodec": "mask_codec", "mask_from_tokens": "mask_codec", "tokens_from_mask": "mask_codec",
    "make_random_codec": "mask_codec",
}

__all__ = [
    "Detection", "ParseResult", "parse_detections", "detections_from_ids", "dedupe", "split_labels",
    "clean_labels", "singular", "plural", "PredictOptions", "PredictionRecord", "TASKS", "Task", "get_task", "register", "box_iou", "encode_box", "decode_loc", "LANGUAGES",
    "caption", "describe", "ocr", "answer", "question", "detect", "segment", "suggest_prompt", "Result", "mask_to_rle", "rle_to_mask", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
