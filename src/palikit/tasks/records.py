"""`PredictionRecord`: the one record of a prediction written to disk, shared by eval and Ray batch.

Both writers build a `PredictionRecord` (`from_result` for an answer, `failure` for an input that
could not be predicted) and write it in their file format, whose fields stay what they were so
existing outputs still resume:

- `eval_row()`: a line of eval's `predictions.jsonl`: {"id", "prompt", "text", "detections": [{"label",
  "box", "score", "mask"}], "errors", "timings", "latency_s"} + "failed": true / "usage" when set;
- `batch_row()`: a row of a Ray batch part file: {"id", "task", "key", "prompt", "text", "detections":
  [{"label", "box", "score", "mask_score", "mask"}], "error"} ("" when the input succeeded).

Boxes are pixel (x0, y0, x1, y1) floats of the original image; masks COCO RLE ({size, counts}).
`coco_results` writes detections as COCO results entries (`Result.to_coco`, eval's COCO mAP).
`from_result` takes a `palikit.tasks.Result` or any object / dict with text, detections (label,
box, score, mask), errors, timings, usage (baselines and results files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PredictionRecord", "coco_results", "detection_record"]


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def detection_record(d: Any) -> dict[str, Any]:
    """One detection as plain values: label, box, score, mask_score, mask (RLE or None)."""
    from .rle import mask_to_rle

    mask, score, mask_score = _get(d, "mask"), _get(d, "score"), _get(d, "mask_score")
    if mask is not None and not isinstance(mask, Mapping):
        mask = mask_to_rle(np.asarray(mask, dtype=bool))
    return {"label": str(_get(d, "label", "")), "box": [float(v) for v in _get(d, "box")],
            "score": None if score is None else float(score),
            "mask_score": None if mask_score is None else float(mask_score), "mask": mask}


def coco_results(image_id: int, detections: Any, category_ids: Mapping[str, int], *,
                 masks: str = "when-present") -> list[dict[str, Any]]:
    """COCO results entries {"image_id", "category_id", "bbox": [x, y, w, h] (0.01 px), "score"} (what
    pycocotools' loadRes reads) of detections with `label`, `box` (x0, y0, x1, y1 pixels), `score` (None ->
    1.0) and `mask` (bool HxW, COCO RLE or None); objects or dicts. Labels match a category name exactly,
    then case-insensitively; unknown labels are left out. `masks`: "when-present" adds a compressed-RLE
    "segmentation" where a detection has a mask, "only" keeps just those (a mask evaluation), "none"."""
    from .rle import mask_to_rle, rle_to_mask

    if masks not in ("when-present", "only", "none"):
        raise ValueError(f"masks must be when-present, only or none; got {masks!r}")
    lower = {k.lower().strip(): v for k, v in category_ids.items()}
    out = []
    for d in detections:
        label = str(_get(d, "label", ""))
        cid = category_ids.get(label, lower.get(label.lower().strip()))
        mask = _get(d, "mask") if masks != "none" else None
        if cid is None or (mask is None and masks == "only"):
            continue
        x0, y0, x1, y1 = (float(v) for v in _get(d, "box"))
        score = _get(d, "score")
        item: dict[str, Any] = {"image_id": int(image_id), "category_id": int(cid),
                                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                "score": 1.0 if score is None else float(score)}
        if mask is not None:
            item["segmentation"] = mask_to_rle(rle_to_mask(mask) if isinstance(mask, Mapping) else mask, compressed=True)
        out.append(item)
    return out


@dataclass
class PredictionRecord:
    id: str
    prompt: str
    text: str = ""
    detections: list[dict[str, Any]] = field(default_factory=list)  # detection_record() dicts
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    latency_s: float | None = None  # None: not timed (failed, or a results file)
    failed: bool = False
    usage: dict[str, int] | None = None  # token counts an API reported
    task: str | None = None  # Ray batch: the task and the reuse key of the row
    key: str | None = None

    @classmethod
    def from_result(cls, id: str, prompt: str, result: Any, *, latency_s: float | None = None,
                    **extra: Any) -> PredictionRecord:
        timings = _get(result, "timings", None) or {}
        usage = _get(result, "usage", None)
        rec = cls(id=str(id), prompt=str(prompt), text=str(_get(result, "text", "") or ""),
                  detections=[detection_record(d) for d in _get(result, "detections", None) or []],
                  errors=[str(e) for e in _get(result, "errors", None) or []],
                  timings={k: float(v) for k, v in timings.items()},
                  latency_s=None if latency_s is None else float(latency_s),
                  usage={k: int(v) for k, v in dict(usage).items() if isinstance(v, (int, float))} if usage else None,
                  **extra)
        if _get(result, "failed", False):  # the adapter gave up on this sample (e.g. the API kept failing)
            rec.failed, rec.latency_s = True, None
        return rec

    @classmethod
    def failure(cls, id: str, prompt: str, error: str, **extra: Any) -> PredictionRecord:
        """An input that could not be predicted (missing / unreadable image, a call that kept failing)."""
        return cls(id=str(id), prompt=str(prompt), errors=[str(error)], failed=True, **extra)

    def eval_row(self) -> dict[str, Any]:
        row = {"id": self.id, "prompt": self.prompt, "text": self.text,
               "detections": [{k: d[k] for k in ("label", "box", "score", "mask")} for d in self.detections],
               "errors": list(self.errors), "timings": dict(self.timings), "latency_s": self.latency_s}
        if self.failed:
            row["failed"] = True
        if self.usage:
            row["usage"] = dict(self.usage)
        return row

    def batch_row(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "key": self.key, "prompt": self.prompt, "text": self.text,
                "detections": [dict(d) for d in self.detections],
                "error": "; ".join(self.errors) if self.failed else ""}
