"""Per-task scoring used by the runner: a per-sample score (for the running metric and the per-sample
table) and the corpus-level metrics with the task's primary metric.

Prediction records are plain dicts: {"id", "prompt", "text", "detections": [{"label", "box" (x0, y0,
x1, y1 pixels), "score", "mask" (bool HxW or None)}], "errors", "timings", "latency_s"}.

| task    | primary      | others                                  | definition (see metrics_text / _detection) |
|---------|--------------|-----------------------------------------|--------------------------------------------|
| ocr     | accuracy     | cer, exact_match (normalised)           | 1 - lev / max(len)                         |
| vqa     | accuracy     | accuracy/<answer_type>                  | VQAv2 leave-one-out                        |
| anls    | anls         | exact_match                             | DocVQA ANLS, tau 0.5, lower-cased          |
| caption | cider        |                                         | CIDEr-D (pycocoevalcap scale)              |
| count   | accuracy     |                                         | integer exact match                        |
| exact   | exact_match  |                                         | any reference, case/space-normalised       |
| detect  | map          | map50, map75                            | COCO box AP                                |
| segment | miou         | boxacc/0.5, boxacc/0.75 (referring) ;   | big_vision RefCOCO / COCO mask AP          |
|         |              | mask_map, map, ... (COCO json)          |                                            |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import metrics_detection as D
from . import metrics_text as T

PRIMARY = {"ocr": "accuracy", "vqa": "accuracy", "anls": "anls", "caption": "cider", "count": "accuracy",
           "exact": "exact_match", "detect": "map", "segment": "miou"}


def sample_score(task: str, rec: Mapping[str, Any], sample: Any) -> float | None:
    """Per-sample score in the task's primary metric, or None for corpus-level metrics (CIDEr, mAP)."""
    text = str(rec.get("text", ""))
    refs = list(sample.refs)
    if task == "ocr":
        return T.ocr_accuracy(text, refs[0] if refs else "", normalize=True)
    if task == "vqa":
        return T.vqa_accuracy(text, refs)
    if task == "anls":
        return T.anls(text, refs)
    if task == "count":
        return T.count_accuracy(text, refs[0])
    if task == "exact":
        return max(T.exact_match(text, r, normalize=True) for r in refs)
    if task == "segment" and "gt_mask" in sample.meta:
        return D.segmentation_sample_iou(rec.get("detections", []), sample.meta["gt_mask"])
    return None


def category_lookup(coco: Mapping[str, Any]) -> dict[str, int]:
    """Category name -> id, with singular and plural spellings added (prompt variants ask for "dogs")."""
    from ..tasks.prompts import singular
    from .runner import pluralize

    out: dict[str, int] = {}
    for c in coco["categories"]:
        name = c["name"]
        for alias in (singular(name), pluralize(singular(name)), name.lower()):
            out.setdefault(alias, c["id"])
        out[name] = c["id"]
    return out


def _coco_results(recs, samples, coco, with_masks):
    cats = category_lookup(coco)
    res = []
    for s in samples:
        res += D.predictions_to_coco(s.meta["image_id"], recs[s.id].get("detections", []), cats,
                                     with_masks=with_masks)
    return res


def _coco_miou(recs, samples, coco) -> float:
    """Mean over ground-truth instances of the IoU with a predicted mask of the same category, matched
    greedily by IoU (each prediction used once); unmatched or invalid instances score 0."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        cgt = COCO()
        cgt.dataset = {"info": {}, "licenses": [], **coco}
        cgt.createIndex()
    cats = category_lookup(coco)
    ious = []
    for s in samples:
        anns = cgt.imgToAnns.get(s.meta["image_id"], [])
        preds = [d for d in recs[s.id].get("detections", []) if d.get("mask") is not None]
        pairs = []
        for gi, a in enumerate(anns):
            gm = cgt.annToMask(a).astype(bool)
            for pi, d in enumerate(preds):
                cid = cats.get(d["label"], cats.get(str(d["label"]).lower()))
                if cid == a["category_id"]:
                    pairs.append((D.mask_iou(d["mask"], gm), gi, pi))
        used_g, used_p, best = set(), set(), {}
        for iou, gi, pi in sorted(pairs, reverse=True):
            if gi not in used_g and pi not in used_p:
                used_g.add(gi)
                used_p.add(pi)
                best[gi] = iou
        ious += [best.get(gi, 0.0) for gi in range(len(anns))]
    return float(np.mean(ious)) if ious else float("nan")


def corpus_metrics(task: str, recs: Mapping[str, Mapping[str, Any]], samples: Sequence[Any],
                   coco: Mapping[str, Any] | None = None) -> dict[str, float]:
    """All metrics of the task over `samples` (each must have a record in `recs`, keyed by id)."""
    texts = [str(recs[s.id].get("text", "")) for s in samples]
    out: dict[str, float] = {}
    if task in ("ocr", "vqa", "anls", "count", "exact"):
        out[PRIMARY[task]] = T.mean(sample_score(task, recs[s.id], s) for s in samples)
    if task in ("ocr", "vqa", "anls", "count", "exact"):  # per-domain breakdown (Roboflow OCR benchmark)
        by_domain: dict[str, list[float]] = {}
        for s in samples:
            if "domain" in s.meta:
                by_domain.setdefault(str(s.meta["domain"]), []).append(sample_score(task, recs[s.id], s))
        out.update({f"{PRIMARY[task]}/domain/{k}": T.mean(v) for k, v in sorted(by_domain.items())})
    if task == "ocr":
        refs = [s.refs[0] if s.refs else "" for s in samples]
        out["cer"] = T.corpus_cer(texts, refs, normalize=True)
        out["exact_match"] = T.mean(T.exact_match(t, r, normalize=True) for t, r in zip(texts, refs))
    elif task == "vqa":
        by_type: dict[str, list[float]] = {}
        for s in samples:
            if "answer_type" in s.meta:
                by_type.setdefault(str(s.meta["answer_type"]), []).append(sample_score(task, recs[s.id], s))
        out.update({f"accuracy/{k}": T.mean(v) for k, v in sorted(by_type.items())})
    elif task == "anls":
        out["exact_match"] = T.mean(max(T.exact_match(t, r, normalize=True) for r in s.refs)
                                    for t, s in zip(texts, samples))
    elif task == "caption":
        out["cider"] = T.cider_d(texts, [s.refs for s in samples])[0] if samples else float("nan")
    elif task == "detect":
        if coco is None:
            raise ValueError("detection needs a COCO ground truth (a COCO json dataset)")
        ids = [s.meta["image_id"] for s in samples]
        out.update(D.coco_map(coco, _coco_results(recs, samples, coco, False), image_ids=ids))
    elif task == "segment":
        if coco is not None:
            ids = [s.meta["image_id"] for s in samples]
            out["miou"] = _coco_miou(recs, samples, coco)
            box = D.coco_map(coco, _coco_results(recs, samples, coco, False), image_ids=ids)
            segm = D.coco_map(coco, _coco_results(recs, samples, coco, True), iou_type="segm", image_ids=ids)
            out.update(map=box["map"], map50=box["map50"], mask_map=segm["map"], mask_map50=segm["map50"])
        else:
            pm, pb = [], []
            for s in samples:
                dets = recs[s.id].get("detections", [])
                pm.append(dets[0].get("mask") if dets else None)
                pb.append(dets[0].get("box") if dets else None)
            r = D.referring_segmentation_scores(pm, pb, [s.meta["gt_mask"] for s in samples],
                                                [s.meta["gt_box"] for s in samples])
            out.update({k: v for k, v in r.items() if k != "ious"})
    return out
