"""Detection and segmentation metrics.

- COCO mAP@[.5:.95] / mAP@0.5 / mAP@0.75 (box or mask) via pycocotools' `COCOeval` (or
  faster-coco-eval's drop-in copy when pycocotools is missing): the standard 101-point interpolated AP,
  maxDets 100, averaged over categories that have ground truth. Our predictions (label, pixel box
  x0,y0,x1,y1, score, optional mask) are converted to COCO results (`tasks.records.coco_results`: `bbox`
  = [x, y, w, h]); labels are mapped to category ids by name (exact, then case-insensitive); unknown
  labels are dropped; a missing score counts as 1.0 (PaliGemma gives no score unless log-probs are kept, so the ranking is then
  arbitrary and AP is lower than with confidences).
- Referring segmentation as big_vision scores RefCOCO (`evaluators/proj/paligemma/transfers/
  segmentation.py`): one ground-truth instance per sample, the FIRST predicted instance is scored;
  mask IoU of the predicted full-resolution mask vs the ground-truth mask; an invalid prediction
  (no instance, no mask, degenerate box) scores IoU 0; `miou` = mean per-sample IoU; `boxacc/t` =
  fraction of samples whose predicted box has IoU >= t with the ground-truth box (missing box = 0).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..tasks.boxes import box_iou


def _cocoeval_classes():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        except ImportError as e:
            raise ImportError(
                "COCO mAP needs pycocotools (pip install pycocotools) or faster-coco-eval "
                "(pip install faster-coco-eval)") from e
    return COCO, COCOeval


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def coco_map(coco_gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], *, iou_type: str = "bbox",
             image_ids: Sequence[int] | None = None, per_class: bool = False) -> dict[str, float | None]:
    """COCO AP of `results` (COCO results entries) against the ground-truth dict `coco_gt` (a loaded
    instances json). Returns {"map": AP@[.5:.95], "map50", "map75", "map_small", "map_medium",
    "map_large", "mar1", "mar10", "mar100"}; COCOeval's -1 (no ground truth in that bucket, e.g. no
    large objects) is None: not defined, never a number. No results at all scores 0.0 (None where
    undefined). `image_ids` restricts the evaluation (e.g. to predicted images). `per_class` adds
    "class/<name>/map" and "class/<name>/map50" for every category (None: no ground truth of it)."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError("iou_type must be 'bbox' or 'segm'")
    COCO, COCOeval = _cocoeval_classes()
    gt = dict(coco_gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    gt = {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
    for i, a in enumerate(gt["annotations"]):
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
    keys = ["map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100"]
    if not results:
        return _no_results(gt, keys, image_ids, per_class)
    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = gt
        cgt.createIndex()
        cdt = cgt.loadRes([dict(r) for r in results])
        ev = COCOeval(cgt, cdt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: _defined(s) for k, s in zip(keys, ev.stats[:9])}
    if per_class:
        names = {c["id"]: c["name"] for c in gt.get("categories", [])}
        precision = np.asarray(ev.eval["precision"])  # [T iou thresholds, R recall points, K classes, A areas, M maxDets]
        for k, cid in enumerate(ev.params.catIds):
            every, at50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]  # area "all", maxDets 100
            out[f"class/{names.get(cid, cid)}/map"] = float(every[every > -1].mean()) if (every > -1).any() else None
            out[f"class/{names.get(cid, cid)}/map50"] = float(at50[at50 > -1].mean()) if (at50 > -1).any() else None
    return out


def _defined(stat: float) -> float | None:
    """COCOeval's summary value, or None for its -1 ("no ground truth of this kind")."""
    return None if float(stat) == -1.0 else float(stat)


def _no_results(gt, keys, image_ids, per_class) -> dict[str, float | None]:
    """Scores without any detection: 0.0 where ground truth exists (every object missed), else None."""
    ids = None if image_ids is None else {int(i) for i in image_ids}
    anns = [a for a in gt.get("annotations", []) if ids is None or a["image_id"] in ids]
    out: dict[str, float | None] = {k: (0.0 if anns else None) for k in keys}
    for k, lo, hi in (("map_small", 0, 32 ** 2), ("map_medium", 32 ** 2, 96 ** 2), ("map_large", 96 ** 2, 1e10)):
        out[k] = 0.0 if any(lo <= a["area"] <= hi for a in anns) else None  # COCOeval's areaRng, inclusive
    if per_class:
        have = {a["category_id"] for a in anns}
        for c in gt.get("categories", []):
            for key in ("map", "map50"):
                out[f"class/{c['name']}/{key}"] = 0.0 if c["id"] in have else None
    return out


# ------------------------------------------------------------------------------ segmentation
def mask_iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """IoU of two bool masks of the same shape; None, a shape mismatch or an empty union score 0.0
    (big_vision divides by gt_area + pred_area - inter, which is > 0 for a non-empty gt)."""
    if pred is None:
        return 0.0
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        return 0.0
    union = np.logical_or(p, g).sum()
    return float(np.logical_and(p, g).sum() / union) if union else 0.0


def _valid_box(box: Any) -> bool:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return False
    return x1 > x0 and y1 > y0


def referring_segmentation_scores(pred_masks: Sequence[np.ndarray | None], pred_boxes: Sequence[Any],
                                  gt_masks: Sequence[np.ndarray], gt_boxes: Sequence[Sequence[float]],
                                  *, ious: Sequence[float] = (0.5, 0.75)) -> dict[str, Any]:
    """big_vision RefCOCO scoring over samples (one instance each). `pred_masks[i]` full-resolution
    bool mask or None (invalid output), `pred_boxes[i]` (x0, y0, x1, y1) or None. Returns {"miou",
    "boxacc/0.5", "boxacc/0.75", "invalid", "total", "ious": per-sample IoUs}."""
    n = len(gt_masks)
    if not (len(pred_masks) == len(pred_boxes) == len(gt_boxes) == n):
        raise ValueError("pred_masks, pred_boxes, gt_masks and gt_boxes must have the same length")
    per, invalid, hits = [], 0, {t: 0 for t in ious}
    for pm, pb, gm, gb in zip(pred_masks, pred_boxes, gt_masks, gt_boxes):
        ok_box = pb is not None and _valid_box(pb)
        b_iou = box_iou([float(v) for v in pb], [float(v) for v in gb]) if ok_box else 0.0
        for t in ious:
            hits[t] += int(b_iou >= t)
        if not ok_box or pm is None:
            invalid += 1
            per.append(0.0)
        else:
            per.append(mask_iou(pm, gm))
    out: dict[str, Any] = {"miou": float(np.mean(per)) if per else float("nan")}
    for t in ious:
        out[f"boxacc/{t}"] = hits[t] / n if n else float("nan")
    out.update(invalid=invalid, total=n, ious=per)
    return out


def segmentation_sample_iou(detections: Sequence[Any], gt_mask: np.ndarray) -> float:
    """Per-sample IoU as big_vision: the first detection's mask vs the ground truth; 0 when invalid."""
    if not detections:
        return 0.0
    d = detections[0]
    if not _valid_box(_get(d, "box")):
        return 0.0
    return mask_iou(_get(d, "mask"), gt_mask)
