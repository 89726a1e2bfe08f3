"""The typed `Result` of one prediction, and its JSON / COCO / supervision conversions.

Owns: `Result` (text, prompt, image size, detections, parse errors, timings, tokens, log-probs,
prompt hint) and the optional `supervision` export (imported lazily). Masks travel as COCO RLE
(`rle.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .choices import ChoiceScore
from .parse import Detection, detection_to_dict
from .rle import mask_to_rle, rle_to_mask

__all__ = ["Result"]


# ------------------------------------------------------------------------------ Result
@dataclass(eq=False)
class Result:
    """What a prediction returns: the generated `text`, parsed `detections` (pixel boxes in the
    original `image_size` = (w, h), optional masks), parse `errors`, `timings` in ms, the generated
    `tokens` and their `token_logprobs`, a `hint` when the prompt looks like a missed task keyword, and
    for a closed-set answer (`choices=`) every choice's score in the order given (`tasks.choices`)."""

    text: str
    prompt: str = ""
    image_size: tuple[int, int] = (0, 0)
    detections: list[Detection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] | None = None
    hint: str | None = None
    choices: list[ChoiceScore] | None = None

    def to_dict(self) -> dict[str, Any]:
        dets = []
        for d in self.detections:
            item = detection_to_dict(d)
            item["mask"] = None if d.mask is None else mask_to_rle(d.mask)
            dets.append(item)
        return {
            "text": self.text,
            "prompt": self.prompt,
            "image_size": [int(v) for v in self.image_size],
            "detections": dets,
            "errors": list(self.errors),
            "timings": {k: round(float(v), 3) for k, v in self.timings.items()},
            "tokens": [int(t) for t in self.tokens],
            "token_logprobs": None if self.token_logprobs is None else [float(x) for x in self.token_logprobs],
            "hint": self.hint,
            **({} if self.choices is None else {"choices": [c.to_dict() for c in self.choices]}),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Result:
        dets = []
        for d in data.get("detections", []):
            dets.append(Detection(
                label=d["label"], box=tuple(float(v) for v in d["box"]), loc=tuple(int(v) for v in d["loc"]),
                score=d.get("score"), mask_score=d.get("mask_score"),
                seg_tokens=None if d.get("seg_tokens") is None else tuple(int(v) for v in d["seg_tokens"]),
                mask=None if d.get("mask") is None else rle_to_mask(d["mask"]),
                requested=bool(d.get("requested", True)),
            ))
        lp = data.get("token_logprobs")
        return cls(
            text=data.get("text", ""), prompt=data.get("prompt", ""),
            image_size=tuple(int(v) for v in data.get("image_size", (0, 0))), detections=dets,
            errors=list(data.get("errors", [])), timings=dict(data.get("timings", {})),
            tokens=[int(t) for t in data.get("tokens", [])], token_logprobs=None if lp is None else list(lp),
            hint=data.get("hint"),
            choices=None if data.get("choices") is None else [
                ChoiceScore(c["text"], float(c["logprob"]), float(c["probability"])) for c in data["choices"]],
        )

    @classmethod
    def from_json(cls, text: str) -> Result:
        return cls.from_dict(json.loads(text))

    def to_coco(self, image_id: int, category_ids: Mapping[str, int]) -> list[dict[str, Any]]:
        """COCO results entries (`records.coco_results`): {"image_id", "category_id", "bbox": [x, y, w, h],
        "score"} plus a compressed-RLE "segmentation" when a mask is present (loadable by pycocotools'
        loadRes). Labels are matched exactly, then case-insensitively; unknown labels are left out. A
        detection without a score gets 1.0."""
        from .records import coco_results

        return coco_results(image_id, self.detections, category_ids)

    def to_supervision(self) -> Any:
        """`supervision.Detections` with xyxy, confidence (when every box has a score), masks (when
        any has one; others get empty masks), class_id (order of first appearance) and class_name."""
        try:
            import supervision as sv
        except ImportError as e:
            raise ImportError("Result.to_supervision() needs the supervision package: pip install supervision") from e
        n = len(self.detections)
        w, h = self.image_size
        names = [d.label for d in self.detections]
        classes = list(dict.fromkeys(names))
        xyxy = np.array([d.box for d in self.detections], dtype=np.float32).reshape(n, 4)
        conf = None
        if n and all(d.score is not None for d in self.detections):
            conf = np.array([d.score for d in self.detections], dtype=np.float32)
        mask = None
        if any(d.mask is not None for d in self.detections):
            mask = np.stack([d.mask.astype(bool) if d.mask is not None else np.zeros((h, w), bool)
                             for d in self.detections])  # [N, H, W]
        return sv.Detections(xyxy=xyxy, mask=mask, confidence=conf,
                             class_id=np.array([classes.index(x) for x in names], dtype=int),
                             data={"class_name": np.array(names, dtype=str)})

    def __str__(self) -> str:
        lines = [f"{self.prompt!r} -> {self.text!r}"]
        for d in self.detections:
            x0, y0, x1, y1 = d.box
            parts = [f"  {d.label or '?'}: box ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f})"]
            if d.score is not None:
                parts.append(f"score {d.score:.2f}")
            if d.mask is not None:
                parts.append(f"mask {int(np.asarray(d.mask).sum())} px")
            if not d.requested:
                parts.append("(not requested)")
            lines.append("  ".join(parts))
        lines += [f"  choice {c.text!r}: p={c.probability:.3f} (logprob {c.logprob:.3f})" for c in self.choices or ()]
        lines += [f"  error: {e}" for e in self.errors]
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)
