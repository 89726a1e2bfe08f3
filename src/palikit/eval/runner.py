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
- cost per sample for an API = (prompt tokens x input price + completion tokens x output price) / 1e6
  from the usage the endpoint reports (`price_per_mtok`);
- cost efficiency = score / cost per sample (score points per dollar).

Units: `score` and every table / chart / CLI figure are x100 (percent for accuracies); `metrics` in
report.json keep the raw fractions. A failed sample (missing image, a call that kept failing) is
scored as an empty answer, counted in `failed`, left out of the speed figures and retried on resume.
Ctrl-C / SIGTERM writes the report of the samples done and raises `EvalInterrupted`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import EvalDataset, Sample, canonical_task, check_images, image_problem, load_dataset


def _and(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + (items[-1] if items else "")


def prompt_fields(sample: Sample, lang: str = "en") -> dict[str, str]:
    """Fields a prompt template may use: {question} {prefix} {lang}; the labels asked for as PaliGemma
    writes them, {labels} ("dog ; cat"), and reworded: {labels_singular} {labels_plural}
    {labels_natural} ("dogs and cats"); case: {labels_title} ("Dog ; Cat") {labels_upper} ("DOG ; CAT");
    separators: {labels_comma} ("dog, cat") {labels_and} ("dog and cat") {labels_tight} ("dog;cat")."""
    from ..tasks.labels import plural, singular

    labels = sample.labels or []
    sing = [singular(lbl) for lbl in labels]
    plur = [plural(s) for s in sing]
    return {"question": str(sample.meta.get("question", "")), "prefix": str(sample.meta.get("prefix", "")),
            "lang": lang, "labels": " ; ".join(labels), "labels_singular": " ; ".join(sing),
            "labels_plural": " ; ".join(plur), "labels_natural": _and(plur),
            "labels_title": " ; ".join(lbl.title() for lbl in labels),
            "labels_upper": " ; ".join(lbl.upper() for lbl in labels), "labels_comma": ", ".join(labels),
            "labels_and": _and(labels), "labels_tight": ";".join(labels)}


def check_template(template: str) -> str:
    """`template` when every {field} in it is one of `prompt_fields`'; else ValueError naming the fields."""
    import string

    known = prompt_fields(Sample("", "", "", labels=["x"]))
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"prompt template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    bad = [f for f in names if f not in known]
    if bad:
        raise ValueError(f"prompt template {template!r} uses {{{bad[0]}}}, which is not a field; the fields are "
                         + " ".join(f"{{{k}}}" for k in known))
    return template


def render_prompt(template: str | Callable[[Sample], str], sample: Sample, lang: str = "en") -> str:
    return template(sample) if callable(template) else template.format(**prompt_fields(sample, lang))


def default_prompt(task: str) -> str:
    """The task's default prompt template, from the task table (DocVQA: raw question, as big_vision's transfer)."""
    from ..tasks.registry import eval_task

    return eval_task(task).eval.template


# ------------------------------------------------------------------------------ prediction records
def result_to_record(sample: Sample, result: Any, latency_s: float | None) -> dict[str, Any]:
    """The predictions.jsonl row of one prediction (`tasks.records.PredictionRecord.eval_row`; masks as
    COCO RLE). `latency_s=None`: not timed (failed, or a results file)."""
    from ..tasks.records import PredictionRecord

    return PredictionRecord.from_result(sample.id, sample.prompt, result, latency_s=latency_s).eval_row()


def failed_record(sample: Sample, error: str) -> dict[str, Any]:
    """A sample the model could not answer (missing / unreadable image, a call that kept failing):
    scored as an empty answer, left out of the speed figures, retried on resume."""
    from ..tasks.records import PredictionRecord

    return PredictionRecord.failure(sample.id, sample.prompt, error).eval_row()


def _decode_record(rec: dict[str, Any]) -> dict[str, Any]:
    from ..tasks.rle import rle_to_mask

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
UNITS = {"score": "percent: primary metric x 100 (CIDEr / mAP / mIoU on the same x100 scale)",
         "metrics": "fractions (raw metric values; CIDEr on the pycocoevalcap scale)",
         "latency": "seconds per sample (batch wall time / batch size)",
         "speed_efficiency": "score points per second (score / median s per sample)",
         "cost": "US$ per sample", "cost_efficiency": "score points per US$ (score / $ per sample)"}


@dataclass
class EvalReport:
    """Outcome of `evaluate`. `metrics` holds the raw metric values (fractions; CIDEr on the
    pycocoevalcap scale); `score` = primary metric x 100 (percent); `speed` / `cost` per the module
    docstring; `failed` samples are in `n` (scored as empty answers) and listed in `failures`."""

    model: str
    task: str
    dataset: str
    n: int
    metrics: dict[str, float]
    primary: str
    speed: dict[str, float]
    cost: dict[str, Any]
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    out_dir: str = ""
    files: dict[str, str] = field(default_factory=dict)
    predicted_now: int = 0
    total: int = 0  # samples asked for (n < total when interrupted)
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad rows / images left out (--skip-bad-rows)
    counts: dict[str, Any] = field(default_factory=dict)  # detect / segment: per-class instances, negatives asked
    worst: list[dict[str, Any]] = field(default_factory=list)  # the gallery's samples (files["gallery"]), worst first
    hardware: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the model / adapter's choices (psm, endpoint...)
    interrupted: bool = False

    @property
    def score(self) -> float:
        v = self.metrics.get(self.primary)
        return float("nan") if v is None else 100.0 * float(v)

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
                "median_latency_s": self.speed.get("median_s"), "mean_latency_s": self.speed.get("mean_s"),
                "cost_per_call": self.cost.get("cost_per_sample"), "price": self.cost.get("price"),
                "speed_efficiency": self.speed_efficiency, "cost_efficiency": self.cost_efficiency,
                "n": self.n, "failed": self.failed, "device": self.hardware.get("device"),
                "torch_threads": self.hardware.get("torch_threads"), "source": "this run",
                "domains": {k.rsplit("/", 1)[1]: 100 * v for k, v in self.metrics.items() if "/domain/" in k}}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "n": self.n, "total": self.total,
                "failed": self.failed, "interrupted": self.interrupted, "prompt": self.prompt,
                "primary": self.primary, "score": self.score, "units": UNITS, "metrics": self.metrics,
                "speed": self.speed, "hardware": self.hardware, "cost": self.cost,
                "speed_efficiency": self.speed_efficiency, "cost_efficiency": self.cost_efficiency,
                "settings": self.settings, "predicted_now": self.predicted_now, "files": self.files,
                "failures": self.failures, "skipped": self.skipped, "counts": self.counts, "worst": self.worst,
                "per_sample": self.per_sample}


def speed_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Latency median / p90 / mean (s per sample), throughput (samples/s) and the model timings the
    Results report: image_ms per sample (mean), prefill_ms / decode_ms per BATCH (mean), decode_step_ms
    (median). Untimed records (failed samples, results files) are left out."""
    timed = [r for r in records if r.get("latency_s") is not None]
    lat = np.array([float(r["latency_s"]) for r in timed], dtype=float)
    out: dict[str, float] = {}
    if lat.size:
        out.update(median_s=float(np.median(lat)), p90_s=float(np.percentile(lat, 90)), mean_s=float(lat.mean()),
                   throughput_per_s=float(lat.size / lat.sum()) if lat.sum() > 0 else float("nan"))
    for key in ("image_ms", "prefill_ms", "decode_ms", "decode_step_ms"):
        vals = [float(r["timings"][key]) for r in timed if key in r.get("timings", {})]
        if vals:
            out[key] = float(np.median(vals)) if key == "decode_step_ms" else float(np.mean(vals))
    if "prefill_ms" in out and "decode_ms" in out and out["prefill_ms"] + out["decode_ms"] > 0:
        out["decode_share"] = out["decode_ms"] / (out["prefill_ms"] + out["decode_ms"])
    return out


def cost_stats(speed: Mapping[str, float], price_per_hour: float | None, price_per_call: float | None,
               records: Sequence[Mapping[str, Any]] = (), price_per_mtok: Sequence[float] | None = None
               ) -> dict[str, Any]:
    """$ per sample by one rule, named in `price`: hardware time (price_per_hour x MEAN s / 3600), a
    price per call, or tokens ((prompt_tokens x in + completion_tokens x out) / 1e6 with the
    endpoint's reported usage, mean over samples; `price_per_mtok` = (in, out) $ per million)."""
    given = [p is not None for p in (price_per_hour, price_per_call, price_per_mtok)]
    if sum(given) > 1:
        raise ValueError("give one price rule: price_per_hour (self-hosted), price_per_call or price_per_mtok (API)")
    per, price = None, "no price given"
    out: dict[str, Any] = {"price_per_hour": price_per_hour, "price_per_call": price_per_call}
    if price_per_call is not None:
        per, price = float(price_per_call), f"${price_per_call} per call"
    elif price_per_hour is not None and "mean_s" in speed:
        per = float(price_per_hour) * speed["mean_s"] / 3600.0
        price = f"${price_per_hour}/h x mean s per sample / 3600"
    elif price_per_mtok is not None:
        pin, pout = (float(v) for v in price_per_mtok)
        used = [r["usage"] for r in records if r.get("usage")]
        out["price_per_mtok"] = {"input": pin, "output": pout}
        price = f"(prompt tokens x ${pin} + completion tokens x ${pout}) / 1e6"
        if used:
            pt = float(np.mean([u.get("prompt_tokens", 0) for u in used]))
            ct = float(np.mean([u.get("completion_tokens", 0) for u in used]))
            per = (pt * pin + ct * pout) / 1e6
            out.update(prompt_tokens_mean=pt, completion_tokens_mean=ct, samples_with_usage=len(used))
        else:
            price += " (the endpoint reported no token usage: no cost)"
    return {**out, "price": price, "cost_per_sample": per}


# ------------------------------------------------------------------------------ interrupts
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt (see `sigterm_interrupts`)."""

    signum = 15


class EvalInterrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C / SIGTERM. Predictions made so far are on disk, `report` covers them
    (written as report.json / report.md, marked interrupted); rerunning resumes. `exit_code`: 130
    for SIGINT, 143 for SIGTERM (128 + signal number)."""

    def __init__(self, report: EvalReport, signum: int = 2):
        super().__init__(f"interrupted after {report.n} of {report.total} samples")
        self.report, self.signum = report, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class sigterm_interrupts:
    """Within the block, SIGTERM raises `Terminated` in the main thread (so `evaluate` flushes and
    reports as on Ctrl-C); the previous handler comes back afterwards."""

    def __enter__(self):
        import signal
        import threading

        self._prev = None
        if threading.current_thread() is threading.main_thread():
            def raise_terminated(signum, frame):
                raise Terminated()

            self._prev = signal.signal(signal.SIGTERM, raise_terminated)
        return self

    def __exit__(self, *exc):
        import signal

        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


# ------------------------------------------------------------------------------ evaluate
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
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(marker, json.dumps({"name": name, "fingerprint": fp}))


def _predict(model: Any, batch: Sequence[Sample], opts: Mapping[str, Any], timed: bool) -> list[dict[str, Any]]:
    """Records for one batch. Missing images become failed records without a call (unless the model
    needs no images: a results file); when the batch call raises, each sample is tried alone so one
    bad image fails only itself."""
    import time

    check = getattr(model, "needs_images", True)
    problems = {s.id: image_problem(s.image) if check else None for s in batch}
    ok = [s for s in batch if problems[s.id] is None]
    recs = {s.id: failed_record(s, problems[s.id]) for s in batch if problems[s.id] is not None}

    def call(group: Sequence[Sample]) -> list[dict[str, Any]]:
        labels = [s.labels for s in group] if any(s.labels for s in group) else None
        t0 = time.perf_counter()
        results = model.predict_batch([s.image for s in group], [s.prompt for s in group], labels=labels, **opts)
        dt = time.perf_counter() - t0
        if len(results) != len(group):
            raise RuntimeError(f"model returned {len(results)} results for {len(group)} prompts")
        return [result_to_record(s, r, dt / len(group) if timed else None) for s, r in zip(group, results)]

    if ok:
        try:
            recs.update({r["id"]: r for r in call(ok)})
        except Exception as e:  # noqa: BLE001 - isolate the failing sample(s), keep the run going
            if len(ok) == 1:
                recs[ok[0].id] = failed_record(ok[0], f"{type(e).__name__}: {e}")
            else:
                for s in ok:
                    recs.update({r["id"]: r for r in _predict(model, [s], opts, timed)})
    return [recs[s.id] for s in batch]


def _build_report(model, name, task, ds, samples, recs, template, out, pred_path, prices, predicted_now,
                  interrupted=False) -> EvalReport:
    from . import metrics_tasks as MT
    from .progress import hardware

    done = [s for s in samples if s.id in recs]
    metrics = MT.corpus_metrics(task, recs, done, ds.coco) if done else {}
    records = [recs[s.id] for s in done]
    speed = speed_stats(records)
    failures = [{"id": s.id, "error": "; ".join(recs[s.id]["errors"])} for s in done if recs[s.id].get("failed")]
    per_sample = [{"id": s.id, "score": MT.sample_score(task, recs[s.id], s), "text": recs[s.id]["text"],
                   "refs": s.refs, **({"domain": s.meta["domain"]} if "domain" in s.meta else {}),
                   **({"failed": True} if recs[s.id].get("failed") else {})} for s in done]
    settings = getattr(model, "settings", None)
    settings = settings() if callable(settings) else dict(settings or {})
    return EvalReport(model=name, task=task, dataset=str(ds.path), n=len(done), metrics=metrics,
                      primary=MT.primary(task), speed=speed, cost=cost_stats(speed, prices[0], prices[1], records, prices[2]),
                      per_sample=per_sample,
                      prompt=template if isinstance(template, str) else getattr(template, "__name__", "callable"),
                      out_dir=str(out), files={"predictions": str(pred_path)}, predicted_now=predicted_now,
                      total=len(samples), failed=len(failures), failures=failures,
                      skipped=[{"where": p.where, "error": p.message} for p in ds.problems],
                      counts=MT.counts(task, recs, done, ds.coco) if done else {}, hardware=hardware(model),
                      settings=settings, interrupted=interrupted)


def _write_gallery(report: EvalReport, task, samples, recs, coco, path: Path, n: int) -> None:
    """worst.png of the `n` worst predictions (a stale one from an earlier run is removed when no
    sample is wrong now), listed in `report.worst` and linked as `report.files["gallery"]`."""
    from .gallery import write_gallery

    worst = write_gallery(task, samples, recs, coco, path, n)
    if not worst:
        path.unlink(missing_ok=True)
        return
    report.files["gallery"] = str(path)
    report.worst = [{"id": e.sample.id, "score": e.score, "why": "; ".join(e.lines)} for e in worst]


def evaluate(model: Any, dataset: str | Path | EvalDataset | Sequence[Sample], task: str, *, batch_size: int = 8,
             out_dir: str | Path, price_per_hour: float | None = None, price_per_call: float | None = None,
             price_per_mtok: Sequence[float] | None = None,
             resume: bool = True, progress: bool = True, prompt: str | Callable[[Sample], str] | None = None,
             lang: str = "en", model_name: str | None = None, predict_options: Mapping[str, Any] | None = None,
             image_root: str | Path | None = None, limit: int | None = None, strict: bool = True,
             compare_with: str | Path | None = None, charts: bool = True, gallery: int = 12,
             progress_label: str | None = None) -> EvalReport:
    """Evaluate `model` (anything with `predict_batch(images, prompts, labels=None, **opts)`; see
    `palikit.eval.baselines` for Tesseract, OpenAI-compatible endpoints and COCO results files) on
    `dataset` for `task` (see `TASKS`). Predictions are appended to `out_dir/predictions.jsonl` as they
    come; with `resume=True` samples already there are skipped (failed ones are retried; resume=False
    starts afresh). `prompt` overrides the task's template (fields: {question} {prefix} {lang} {labels}
    {labels_singular} {labels_plural} {labels_natural}) or is a callable(sample) -> str; rows with a
    "prefix" keep it unless `prompt` is given. A missing image or a failing call fails only its sample
    (scored as an empty answer, counted in `failed`); with strict=False a missing or unreadable image
    is skipped up front and listed in `skipped` (`datasets.check_images`). Ctrl-C / SIGTERM (`sigterm_interrupts`) writes
    the report of the samples done and raises `EvalInterrupted`. Writes report.json, report.md and
    (charts=True, matplotlib) PNG charts, with the rows of `compare_with` (a cached-results file or
    another palikit report.json) side by side, and (`gallery` > 0) worst.png, the `gallery` worst
    predictions drawn (`eval.gallery`). `progress_label` names the progress bar (default 'eval NAME')."""
    from . import metrics_tasks as MT
    from . import report as R
    from .progress import progress as make_progress

    task = canonical_task(task)
    ds = load_dataset(dataset, task, image_root=image_root, strict=strict)
    opts = dict(predict_options or {})
    api = sys.modules.get("palikit.api")  # loaded whenever `model` can be a PaliGemma
    if api is not None and isinstance(model, api.PaliGemma):
        from ..tasks.options import PredictOptions

        PredictOptions.from_kwargs(opts)  # a bad option fails first, not as every sample failing
    if getattr(model, "needs_images", True):
        ds = check_images(ds, strict=strict)
    samples = ds.samples[:limit] if limit is not None else list(ds.samples)
    template = check_template(prompt) if isinstance(prompt, str) else prompt if prompt is not None \
        else default_prompt(task)
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
    recs = {i: r for i, r in recs.items() if not r.get("failed")}  # failed samples are tried again
    todo = [s for s in samples if s.id not in recs]
    timed = getattr(model, "timed", True)
    prices = (price_per_hour, price_per_call, price_per_mtok)
    prog = make_progress(progress, name, len(samples), len(samples) - len(todo), progress_label)
    scores = [v for s in samples if s.id in recs and (v := MT.sample_score(task, recs[s.id], s)) is not None]
    predicted_now = 0
    try:
        with open(pred_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                for s, rec in zip(batch, _predict(model, batch, opts, timed)):
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    recs[s.id] = _decode_record(rec)
                    predicted_now += 1
                    v = MT.sample_score(task, recs[s.id], s)
                    if v is not None:
                        scores.append(v)
                if prog is not None:
                    prog.update(len(batch), f"{MT.primary(task)} {100 * sum(scores) / len(scores):.1f}%"
                                if scores else "")
    except KeyboardInterrupt as e:
        if prog is not None:
            prog.stop()
            prog = None
        report = _build_report(model, name, task, ds, samples, recs, template, out, pred_path, prices,
                               predicted_now, interrupted=True)
        if report.n:
            R.write_report(report, out, charts=False)
        raise EvalInterrupted(report, getattr(e, "signum", 2)) from e
    finally:
        if prog is not None:
            prog.stop()

    report = _build_report(model, name, task, ds, samples, recs, template, out, pred_path, prices, predicted_now)
    if gallery:
        _write_gallery(report, task, samples, recs, ds.coco, out / "worst.png", gallery)
    cached = R.load_cached_results(compare_with) if compare_with else []
    R.write_report(report, out, cached=cached, charts=charts)
    return report
