"""Evaluation runner: load a dataset (JSONL or COCO json), predict in batches while appending every
prediction to a JSONL file (so an interrupted run resumes where it stopped), then score accuracy,
speed and cost, and write the report.

Speed and cost definitions (stated in every report):
- per-sample latency = wall time of the `predict_batch` call / batch size (amortised, end to end:
  image loading, preprocessing, prefill, decode, parsing); median and p90 over samples;
- throughput = samples / total predict wall time (samples per second);
- score = primary metric x 100 (percent for accuracies, the usual x100 scale for CIDEr / mAP / mIoU);
- speed efficiency = score / median seconds per sample;
- cost per sample = price_per_hour x MEAN seconds per sample / 3600 (= the bill for the run / samples),
  or price_per_call;
- cost efficiency = score / cost per sample (score points per dollar).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("ocr", "vqa", "anls", "caption", "count", "exact", "detect", "segment")
_ALIASES = {"docvqa": "anls", "vqav2": "vqa", "captions": "caption", "cap": "caption", "counting": "count",
            "detection": "detect", "segmentation": "segment", "refcoco": "segment", "tallyqa": "count"}


def canonical_task(task: str) -> str:
    t = _ALIASES.get(task.lower(), task.lower())
    if t not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} (aliases: {', '.join(_ALIASES)})")
    return t


@dataclass
class Sample:
    """One evaluation item. `refs`: reference texts (answers, captions, OCR text); `labels`: class names
    asked for (detect / segment); `meta`: question, COCO image id, ground-truth mask / box, ..."""

    id: str
    image: str
    prompt: str
    refs: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalDataset:
    samples: list[Sample]
    path: str = ""
    coco: dict[str, Any] | None = None  # COCO ground truth (detect / segment from COCO json)

    def __len__(self) -> int:
        return len(self.samples)


def pluralize(word: str) -> str:
    """Crude English plural of the last word ("dog" -> "dogs", "box" -> "boxes", "bus" -> "buses")."""
    head, _, last = word.rpartition(" ")
    low = last.lower()
    if low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        last = last[:-1] + "ies"
    elif low.endswith(("s", "x", "z", "ch", "sh")):
        last = last + "es"
    else:
        last = last + "s"
    return f"{head} {last}" if head else last


def prompt_fields(sample: Sample, lang: str = "en") -> dict[str, str]:
    """Fields a prompt template may use: {question} {prefix} {lang} {labels} {labels_singular}
    {labels_plural} {labels_natural}."""
    from ..tasks.prompts import singular

    labels = sample.labels or []
    sing = [singular(lbl) for lbl in labels]
    plur = [pluralize(s) for s in sing]
    natural = ", ".join(plur[:-1]) + (" and " if len(plur) > 1 else "") + (plur[-1] if plur else "")
    return {"question": str(sample.meta.get("question", "")), "prefix": str(sample.meta.get("prefix", "")),
            "lang": lang, "labels": " ; ".join(labels), "labels_singular": " ; ".join(sing),
            "labels_plural": " ; ".join(plur), "labels_natural": natural}


def render_prompt(template: str | Callable[[Sample], str], sample: Sample, lang: str = "en") -> str:
    return template(sample) if callable(template) else template.format(**prompt_fields(sample, lang))


_DEFAULT_PROMPTS = {"ocr": "ocr", "vqa": "answer {lang} {question}", "anls": "{question}",
                    "count": "answer {lang} {question}", "exact": "answer {lang} {question}",
                    "caption": "caption {lang}", "detect": "detect {labels}", "segment": "segment {labels}"}


def default_prompt(task: str) -> str:
    """The task's default prompt template (DocVQA: raw question, as big_vision's transfer)."""
    return _DEFAULT_PROMPTS[canonical_task(task)]


def _load_mask(value: Any, root: Path) -> np.ndarray:
    if isinstance(value, Mapping):
        from ..tasks.results import rle_to_mask

        return rle_to_mask(value)
    from PIL import Image

    return np.asarray(Image.open(root / str(value)).convert("L")) > 0


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def load_jsonl(path: str | Path, task: str, *, image_root: str | Path | None = None) -> EvalDataset:
    """Rows: {"image", "prefix", "suffix"} | {"image", "question", "answers": [...] | "answer"} |
    {"image", "captions": [...]} | {"image", "text"} (OCR) | segment: {"image", "prefix" or "label",
    "mask": RLE dict or png path, optional "box": [x0, y0, x1, y1]}. Optional "id" / "question_id".
    Image and mask paths are relative to `image_root` (default: the file's folder)."""
    task = canonical_task(task)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            sid = str(row.get("id", row.get("question_id", i)))
            if "answers" in row:
                refs = [str(a) for a in row["answers"]]
            elif "captions" in row:
                refs = [str(c) for c in row["captions"]]
            else:
                ref = row.get("suffix", row.get("answer", row.get("text", row.get("caption"))))
                refs = [] if ref is None else [str(ref)]
            meta = {k: row[k] for k in ("question", "prefix", "answer_type", "domain") if k in row}
            labels = None
            if task == "segment":
                mask = _load_mask(row["mask"], root)
                meta.update(gt_mask=mask, gt_box=tuple(row["box"]) if "box" in row else _mask_box(mask))
                labels = [row["label"]] if "label" in row else None
            prompt = row["prefix"] if "prefix" in row else ""
            img = row["image"]
            samples.append(Sample(sid, str(root / img), prompt, refs, labels, meta))
    if len({s.id for s in samples}) != len(samples):
        raise ValueError(f"{path}: sample ids are not unique")
    return EvalDataset(samples, str(path))


def load_coco(path: str | Path, task: str = "detect", *, image_root: str | Path | None = None,
              categories: str | Sequence[str] = "present") -> EvalDataset:
    """COCO instances json -> one sample per image (`id` = str(image id)). `categories="present"`
    asks each image only for the categories it contains (images without annotations are skipped): it
    measures localisation, not hallucination of absent classes. `"all"` (or a list of names) asks every
    image for every category: closer to standard COCO mAP, but long prompts (80 classes). Detections
    are mapped back to categories by name (singular / plural spellings accepted)."""
    task = canonical_task(task)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    coco = json.loads(path.read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_image: dict[int, list[str]] = {}
    for a in coco.get("annotations", []):
        per_image.setdefault(a["image_id"], [])
        name = names[a["category_id"]]
        if name not in per_image[a["image_id"]]:
            per_image[a["image_id"]].append(name)
    samples = []
    for img in coco["images"]:
        if categories == "present":
            labels = sorted(per_image.get(img["id"], []), key=lambda n: list(names.values()).index(n))
            if not labels:
                continue  # nothing to ask for: COCOeval ignores images without GT of a category anyway
        elif categories == "all":
            labels = list(names.values())
        else:
            labels = list(categories)
        samples.append(Sample(str(img["id"]), str(root / img["file_name"]), "", [], labels,
                              {"image_id": img["id"], "width": img.get("width"), "height": img.get("height")}))
    return EvalDataset(samples, str(path), coco)


def load_dataset(dataset: str | Path | EvalDataset | Sequence[Sample], task: str, *,
                 image_root: str | Path | None = None) -> EvalDataset:
    """A path (.jsonl -> `load_jsonl`, .json -> `load_coco`), an `EvalDataset` or a list of `Sample`s."""
    if isinstance(dataset, EvalDataset):
        return dataset
    if isinstance(dataset, (str, Path)):
        p = Path(dataset)
        if p.suffix == ".json":
            return load_coco(p, task, image_root=image_root)
        return load_jsonl(p, task, image_root=image_root)
    return EvalDataset(list(dataset))


# ------------------------------------------------------------------------------ prediction records
def result_to_record(sample: Sample, result: Any, latency_s: float) -> dict[str, Any]:
    """JSON-able record of one prediction (masks as COCO RLE). Accepts `palikit.tasks.Result` or any
    object / dict with text, detections (label, box, score, mask), errors, timings."""
    from ..tasks.results import mask_to_rle

    def get(obj, name, default=None):
        return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)

    dets = []
    for d in get(result, "detections", None) or []:
        mask = get(d, "mask")
        score = get(d, "score")
        dets.append({"label": str(get(d, "label", "")), "box": [float(v) for v in get(d, "box")],
                     "score": None if score is None else float(score),
                     "mask": None if mask is None else mask_to_rle(np.asarray(mask, dtype=bool))})
    timings = get(result, "timings", None) or {}
    return {"id": sample.id, "prompt": sample.prompt, "text": str(get(result, "text", "") or ""), "detections": dets,
            "errors": [str(e) for e in get(result, "errors", None) or []],
            "timings": {k: float(v) for k, v in timings.items()}, "latency_s": float(latency_s)}


def _decode_record(rec: dict[str, Any]) -> dict[str, Any]:
    from ..tasks.results import rle_to_mask

    for d in rec.get("detections", []):
        if isinstance(d.get("mask"), Mapping):
            d["mask"] = rle_to_mask(d["mask"])
    return rec


def load_predictions(path: str | Path) -> dict[str, dict[str, Any]]:
    """Records of a predictions JSONL keyed by sample id (later lines win). A torn last line (the run
    was killed mid-write) is ignored, so that sample is predicted again."""
    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.exists():
        return out
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out[str(rec["id"])] = _decode_record(rec)
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (the run died mid-write) so appends start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ------------------------------------------------------------------------------ report object
@dataclass
class EvalReport:
    """Outcome of `evaluate`. `metrics` holds the raw metric values (fractions; CIDEr on the
    pycocoevalcap scale); `score` = primary metric x 100; `speed` / `cost` per the module docstring."""

    model: str
    task: str
    dataset: str
    n: int
    metrics: dict[str, float]
    primary: str
    speed: dict[str, float]
    cost: dict[str, float | None]
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    out_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)
    predicted_now: int = 0

    @property
    def score(self) -> float:
        return 100.0 * float(self.metrics.get(self.primary, float("nan")))

    @property
    def speed_efficiency(self) -> float:
        med = self.speed.get("median_s") or 0.0
        return self.score / med if med > 0 else float("nan")

    @property
    def cost_efficiency(self) -> float | None:
        c = self.cost.get("cost_per_sample")
        return None if not c else self.score / c

    def to_row(self) -> dict[str, Any]:
        """One row of the comparison table (same columns as the cached-results file)."""
        return {"model": self.model, "task": self.task, "metric": self.primary, "accuracy": self.score,
                "median_latency_s": self.speed.get("median_s"), "cost_per_call": self.cost.get("cost_per_sample"),
                "speed_efficiency": self.speed_efficiency, "cost_efficiency": self.cost_efficiency,
                "n": self.n, "source": "this run"}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "n": self.n, "prompt": self.prompt,
                "primary": self.primary, "score": self.score, "metrics": self.metrics, "speed": self.speed,
                "cost": self.cost, "speed_efficiency": self.speed_efficiency,
                "cost_efficiency": self.cost_efficiency, "predicted_now": self.predicted_now,
                "files": self.files, "per_sample": self.per_sample}


def speed_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Latency median / p90 / mean (s), throughput (samples/s) and the mean per-sample model timings
    (image_ms, prefill_ms, decode_ms; median decode_step_ms) reported by the Results."""
    lat = np.array([float(r.get("latency_s", 0.0)) for r in records], dtype=float)
    out: dict[str, float] = {}
    if lat.size:
        out.update(median_s=float(np.median(lat)), p90_s=float(np.percentile(lat, 90)), mean_s=float(lat.mean()),
                   throughput_per_s=float(lat.size / lat.sum()) if lat.sum() > 0 else float("nan"))
    for key in ("image_ms", "prefill_ms", "decode_ms", "decode_step_ms"):
        vals = [float(r["timings"][key]) for r in records if key in r.get("timings", {})]
        if vals:
            out[key] = float(np.median(vals)) if key == "decode_step_ms" else float(np.mean(vals))
    if "prefill_ms" in out and "decode_ms" in out and out["prefill_ms"] + out["decode_ms"] > 0:
        out["decode_share"] = out["decode_ms"] / (out["prefill_ms"] + out["decode_ms"])
    return out


def cost_stats(speed: Mapping[str, float], price_per_hour: float | None, price_per_call: float | None
               ) -> dict[str, float | None]:
    if price_per_hour is not None and price_per_call is not None:
        raise ValueError("give price_per_hour (self-hosted) or price_per_call (API), not both")
    per = None
    if price_per_call is not None:
        per = float(price_per_call)
    elif price_per_hour is not None and "mean_s" in speed:
        per = float(price_per_hour) * speed["mean_s"] / 3600.0
    return {"price_per_hour": price_per_hour, "price_per_call": price_per_call, "cost_per_sample": per}


# ------------------------------------------------------------------------------ evaluate
def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[metric]}"), TimeRemainingColumn(), transient=False)
    prog.start()
    prog.add_task("eval", total=total, completed=done, metric="")
    return prog


def _check_same_model(out: Path, model: Any, name: str, resuming: bool) -> None:
    """Record which model writes `out/predictions.jsonl`; refuse to resume another model's file."""
    fp = getattr(model, "fingerprint", None)
    fp = fp() if callable(fp) else fp
    if fp is None:
        return
    marker = out / "model.json"
    if resuming and marker.exists():
        before = json.loads(marker.read_text())
        if before.get("fingerprint") != fp:
            raise ValueError(f"{out / 'predictions.jsonl'} holds predictions of another model "
                             f"({before.get('name')}, weights {before.get('fingerprint')}; this one: {name}, {fp}); "
                             "use another out_dir or resume=False")
    tmp = marker.with_name(".model.json.tmp")
    tmp.write_text(json.dumps({"name": name, "fingerprint": fp}))
    tmp.replace(marker)


def evaluate(model: Any, dataset: str | Path | EvalDataset | Sequence[Sample], task: str, *, batch_size: int = 8,
             out_dir: str | Path, price_per_hour: float | None = None, price_per_call: float | None = None,
             resume: bool = True, progress: bool = True, prompt: str | Callable[[Sample], str] | None = None,
             lang: str = "en", model_name: str | None = None, predict_options: Mapping[str, Any] | None = None,
             image_root: str | Path | None = None, limit: int | None = None,
             compare_with: str | Path | None = None, charts: bool = True) -> EvalReport:
    """Evaluate `model` (anything with `predict_batch(images, prompts, labels=None, **opts)`) on
    `dataset` for `task` (see `TASKS`). Predictions are appended to `out_dir/predictions.jsonl` as they
    come; with `resume=True` samples already there are skipped (resume=False starts afresh). `prompt`
    overrides the task's template (fields: {question} {prefix} {lang} {labels} {labels_singular}
    {labels_plural} {labels_natural}) or is a callable(sample) -> str; rows with a "prefix" keep it
    unless `prompt` is given. Writes report.json, report.md and (charts=True, matplotlib) PNG charts,
    with the rows of the cached-results file `compare_with` side by side."""
    from . import metrics_tasks as MT

    task = canonical_task(task)
    ds = load_dataset(dataset, task, image_root=image_root)
    samples = ds.samples[:limit] if limit is not None else list(ds.samples)
    template = prompt if prompt is not None else default_prompt(task)
    samples = [s if (prompt is None and s.prompt) else replace(s, prompt=render_prompt(template, s, lang))
               for s in samples]  # copies: the caller's dataset keeps its prompts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    if not resume and pred_path.exists():
        pred_path.unlink()
    recs = load_predictions(pred_path) if resume else {}
    _drop_torn_tail(pred_path)
    prompts = {s.id: s.prompt for s in samples}
    stale = [i for i, r in recs.items() if i in prompts and r.get("prompt") != prompts[i]]
    if stale:
        raise ValueError(f"{pred_path} holds predictions made with other prompts (e.g. sample {stale[0]!r}); "
                         "use another out_dir or resume=False")
    name = model_name or getattr(model, "name", None) or type(model).__name__
    _check_same_model(out, model, name, bool(recs))
    todo = [s for s in samples if s.id not in recs]
    opts = dict(predict_options or {})
    prog = _progress(progress, len(samples), len(samples) - len(todo))
    scores = [v for s in samples if s.id in recs and (v := MT.sample_score(task, recs[s.id], s)) is not None]
    predicted_now = 0
    import time

    try:
        with open(pred_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                labels = [s.labels for s in batch] if any(s.labels for s in batch) else None
                t0 = time.perf_counter()
                results = model.predict_batch([s.image for s in batch], [s.prompt for s in batch], labels=labels,
                                              **opts)
                dt = time.perf_counter() - t0
                if len(results) != len(batch):
                    raise RuntimeError(f"model returned {len(results)} results for {len(batch)} prompts")
                for s, r in zip(batch, results):
                    rec = result_to_record(s, r, dt / len(batch))
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    recs[s.id] = _decode_record(rec)
                    predicted_now += 1
                    v = MT.sample_score(task, recs[s.id], s)
                    if v is not None:
                        scores.append(v)
                if prog is not None:
                    metric = f"{MT.PRIMARY[task]} {100 * sum(scores) / len(scores):.1f}" if scores else ""
                    prog.update(prog.task_ids[0], advance=len(batch), metric=metric)
    finally:
        if prog is not None:
            prog.stop()

    done = [s for s in samples if s.id in recs]
    metrics = MT.corpus_metrics(task, recs, done, ds.coco)
    speed = speed_stats([recs[s.id] for s in done])
    per_sample = [{"id": s.id, "score": MT.sample_score(task, recs[s.id], s), "text": recs[s.id]["text"],
                   "refs": s.refs} for s in done]
    report = EvalReport(model=name, task=task, dataset=str(ds.path), n=len(done), metrics=metrics,
                        primary=MT.PRIMARY[task], speed=speed,
                        cost=cost_stats(speed, price_per_hour, price_per_call), per_sample=per_sample,
                        prompt=template if isinstance(template, str) else getattr(template, "__name__", "callable"),
                        out_dir=str(out), files={"predictions": str(pred_path)}, predicted_now=predicted_now)
    from . import report as R

    cached = R.load_cached_results(compare_with) if compare_with else []
    R.write_report(report, out, cached=cached, charts=charts)
    return report
