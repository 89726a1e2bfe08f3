"""Per-task scoring used by the runner, keyed by the task table's `EvalSpec.metric` (`METRICS`): a
per-sample score (for the running metric and the per-sample table) and the corpus-level metrics with
the task's primary metric. The table below is the built-in `METRICS`.

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tasks.records import coco_results
from . import metrics_detection as D
from . import metrics_text as T

@dataclass(frozen=True)
class Metric:
    """A task table metric (`EvalSpec.metric` names it): the `primary` metric's name, the per-sample
    score (None when the metric is corpus-level only) and the extra corpus metrics (given the records,
    the samples and the COCO ground truth; the mean of per-sample scores and its per-domain
    breakdown are added for metrics with a per-sample score)."""

    primary: str
    sample: Callable[[Mapping[str, Any], Any], float | None] = lambda rec, sample: None
    corpus: Callable[..., dict[str, float]] = lambda recs, samples, coco: {}
    per_sample: bool = True


def _text(rec) -> str:
    return str(rec.get("text", ""))


def _ocr_corpus(recs, samples, coco):
    texts = [_text(recs[s.id]) for s in samples]
    refs = [s.refs[0] if s.refs else "" for s in samples]
    return {"cer": T.corpus_cer(texts, refs, normalize=True),
            "exact_match": T.mean(T.exact_match(t, r, normalize=True) for t, r in zip(texts, refs))}


def _vqa_corpus(recs, samples, coco):
    by_type: dict[str, list[float]] = {}
    for s in samples:
        if "answer_type" in s.meta:
            by_type.setdefault(str(s.meta["answer_type"]), []).append(T.vqa_accuracy(_text(recs[s.id]), s.refs))
    return {f"accuracy/{k}": T.mean(v) for k, v in sorted(by_type.items())}


def _anls_corpus(recs, samples, coco):
    return {"exact_match": T.mean(max(T.exact_match(_text(recs[s.id]), r, normalize=True) for r in s.refs)
                                  for s in samples)}


def _caption_corpus(recs, samples, coco):
    texts = [_text(recs[s.id]) for s in samples]
    return {"cider": T.cider_d(texts, [s.refs for s in samples])[0] if samples else float("nan")}


def _detect_corpus(recs, samples, coco):
    if coco is None:
        raise ValueError("detection needs a COCO ground truth (a COCO json dataset)")
    ids = [s.meta["image_id"] for s in samples]
    return {**D.coco_map(coco, _coco_results(recs, samples, coco, False), image_ids=ids, per_class=True),
            **negatives_fp(recs, samples, coco)}


def _said(rec, cats) -> dict[int, int]:
    """Category id -> boxes of that category in one record (labels mapped by name, as for mAP)."""
    out: dict[int, int] = {}
    for d in rec.get("detections", []):
        cid = cats.get(str(d.get("label")), cats.get(str(d.get("label")).lower()))
        if cid is not None:
            out[cid] = out.get(cid, 0) + 1
    return out


def _negative_queries(recs, samples, coco) -> dict[str, list[int]]:
    """Category name -> [queries for it where absent, those answered with at least one box of it]."""
    cats, names = category_lookup(coco), {c["id"]: c["name"] for c in coco["categories"]}
    asked: dict[str, list[int]] = {}
    for s in samples:
        negs = s.meta.get("negatives") or []
        said = _said(recs[s.id], cats) if negs else {}
        for lab in negs:
            q = asked.setdefault(names[cats[lab]], [0, 0])
            q[0] += 1
            q[1] += int(said.get(cats[lab], 0) > 0)
    return asked


def negatives_fp(recs, samples, coco) -> dict[str, float]:
    """The field report's "hallucinated result": over the classes asked for but absent from the image
    (`Sample.meta["negatives"]`: `--negatives N`, or every absent class with categories="all"), the
    fraction answered with at least one box ("negatives_fp_rate"), also per class
    ("class/<name>/fp_rate"). Empty when no sample asked for an absent class."""
    asked = _negative_queries(recs, samples, coco)
    if not asked:
        return {}
    out = {"negatives_fp_rate": sum(h for _, h in asked.values()) / sum(q for q, _ in asked.values())}
    out.update({f"class/{name}/fp_rate": h / q for name, (q, h) in asked.items()})
    return out


def counts(task: str, recs, samples, coco) -> dict[str, Any]:
    """The counts behind detect / segment rates (COCO ground truth only): ground-truth instances per
    class and, per class, how often it was asked for where absent and answered with a box."""
    if coco is None or metric_of(task).primary not in ("map", "miou"):
        return {}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    ids = {s.meta.get("image_id") for s in samples}
    asked = _negative_queries(recs, samples, coco)
    per = {n: {"instances": 0, "negative_queries": asked.get(n, [0, 0])[0],
               "false_positive_queries": asked.get(n, [0, 0])[1]} for n in names.values()}
    for a in coco["annotations"]:
        if a["image_id"] in ids:
            per[names[a["category_id"]]]["instances"] += 1
    return {"per_class": per}


def _segment_sample(rec, sample):
    if "gt_mask" in sample.meta:
        return D.segmentation_sample_iou(rec.get("detections", []), sample.meta["gt_mask"])
    return None


def _segment_corpus(recs, samples, coco):
    if coco is not None:
        ids = [s.meta["image_id"] for s in samples]
        box = D.coco_map(coco, _coco_results(recs, samples, coco, False), image_ids=ids, per_class=True)
        segm = D.coco_map(coco, _coco_results(recs, samples, coco, True), iou_type="segm", image_ids=ids,
                          per_class=True)
        per_class = {k: v for k, v in box.items() if k.startswith("class/")}
        per_class.update({k.replace("/map", "/mask_map"): v for k, v in segm.items() if k.startswith("class/")})
        return {"miou": _coco_miou(recs, samples, coco), "map": box["map"], "map50": box["map50"],
                "mask_map": segm["map"], "mask_map50": segm["map50"], **per_class,
                **negatives_fp(recs, samples, coco)}
    pm, pb = [], []
    for s in samples:
        dets = recs[s.id].get("detections", [])
        pm.append(dets[0].get("mask") if dets else None)
        pb.append(dets[0].get("box") if dets else None)
    r = D.referring_segmentation_scores(pm, pb, [s.meta["gt_mask"] for s in samples],
                                        [s.meta["gt_box"] for s in samples])
    return {k: v for k, v in r.items() if k != "ious"}


def _first_ref(sample) -> str:
    return sample.refs[0] if sample.refs else ""


METRICS: dict[str, Metric] = {
    "ocr": Metric("accuracy", lambda rec, s: T.ocr_accuracy(_text(rec), _first_ref(s), normalize=True), _ocr_corpus),
    "vqa": Metric("accuracy", lambda rec, s: T.vqa_accuracy(_text(rec), list(s.refs)), _vqa_corpus),
    "anls": Metric("anls", lambda rec, s: T.anls(_text(rec), list(s.refs)), _anls_corpus),
    "count": Metric("accuracy", lambda rec, s: T.count_accuracy(_text(rec), s.refs[0])),
    "exact": Metric("exact_match", lambda rec, s: max(T.exact_match(_text(rec), r, normalize=True) for r in s.refs)),
    "caption": Metric("cider", corpus=_caption_corpus, per_sample=False),
    "detect": Metric("map", corpus=_detect_corpus, per_sample=False),
    "segment": Metric("miou", _segment_sample, _segment_corpus, per_sample=False),
}


def metric_of(task: str) -> Metric:
    """The metric of an evaluable task of the task table (`tasks.registry`)."""
    from ..tasks.registry import eval_task

    key = eval_task(task).eval.metric
    if key not in METRICS:
        raise ValueError(f"task {task!r} names metric {key!r}, which is not in eval.metrics_tasks.METRICS")
    return METRICS[key]


def primary(task: str) -> str:
    return metric_of(task).primary


def sample_score(task: str, rec: Mapping[str, Any], sample: Any) -> float | None:
    """Per-sample score in the task's primary metric, or None for corpus-level metrics (CIDEr, mAP)."""
    return metric_of(task).sample(rec, sample)


def category_lookup(coco: Mapping[str, Any]) -> dict[str, int]:
    """Category name -> id, with singular and plural spellings added (prompt variants ask for "dogs")."""
    from ..tasks.labels import plural, singular

    out: dict[str, int] = {}
    for c in coco["categories"]:
        name = c["name"]
        for alias in (singular(name), plural(singular(name)), name.lower()):
            out.setdefault(alias, c["id"])
        out[name] = c["id"]
    return out


def _coco_results(recs, samples, coco, with_masks):
    cats = category_lookup(coco)
    res = []
    for s in samples:
        res += coco_results(s.meta["image_id"], recs[s.id].get("detections", []), cats,
                            masks="only" if with_masks else "none")
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
    m = metric_of(task)
    out: dict[str, float] = {}
    if m.per_sample:
        out[m.primary] = T.mean(m.sample(recs[s.id], s) for s in samples)
        by_domain: dict[str, list[float]] = {}  # per-domain breakdown (Roboflow OCR benchmark)
        for s in samples:
            if "domain" in s.meta:
                by_domain.setdefault(str(s.meta["domain"]), []).append(m.sample(recs[s.id], s))
        out.update({f"{m.primary}/domain/{k}": T.mean(v) for k, v in sorted(by_domain.items())})
    out.update(m.corpus(recs, samples, coco))
    return out
