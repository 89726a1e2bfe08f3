"""Several systems on one data set, one report: the model first, then each baseline
(`palikit.eval.baselines`), every one through `evaluate` on the same samples with the same
normalisation, timing and cost rules, resumable per model (the first model's predictions in
`out_dir`, each baseline's in `out_dir/baselines/<name>/`). The combined report.json / report.md and
the three charts of the field report (accuracy, median speed efficiency, cost efficiency; one bar
per model) are written to `out_dir`, with every formula printed next to its numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes
from .datasets import check_images, load_dataset
from .report import _fmt, hardware_line, load_cached_results, normalize_row, write_charts
from .runner import UNITS, EvalReport, evaluate

FORMULAS = {
    "accuracy": "OCR: mean over samples of 1 - lev(pred, ref) / max(len(pred), len(ref)) x 100, both sides "
                "lower-cased with whitespace collapsed (the same for every model); other tasks: the primary "
                "metric x 100; failed samples score as empty answers",
    "latency": "s per image = wall time of the predict call / images in it (end to end: reading the image, the "
               "request or the model, parsing); mean and median over the timed images",
    "speed_efficiency": "accuracy % / median s per image",
    "cost": "$ per image: self-hosted = price per hour x mean s per image / 3600; API = (prompt tokens x "
            "input price + completion tokens x output price) / 1e6, mean over images, from the usage the "
            "endpoint reports",
    "cost_efficiency": "accuracy % / $ per image",
}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "model"


@dataclass
class Comparison:
    task: str
    dataset: str
    reports: list[EvalReport]
    cached: list[dict[str, Any]] = field(default_factory=list)
    out_dir: str = ""

    def rows(self) -> list[dict[str, Any]]:
        return [normalize_row(r.to_row()) for r in self.reports] + list(self.cached)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "dataset": self.dataset, "units": UNITS, "formulas": FORMULAS,
                "comparison": self.rows(), "models": [r.to_dict() for r in self.reports]}


def _cell(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    return _fmt(float(v), digits) if isinstance(v, float) else _fmt(v)


def markdown(cmp: Comparison) -> str:
    reps = cmp.reports
    domains = sorted({k.rsplit("/", 1)[1] for r in reps for k in r.metrics if "/domain/" in k})
    head = ["model", "device", "threads", "n", "failed", "accuracy %", *[f"{d} %" for d in domains],
            "mean s / image", "median s / image", "speed eff. (%/s)", "$ / image", "cost eff. (%/$)"]
    lines = [f"# {cmp.task}: {len(reps)} model(s) on `{cmp.dataset}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reps:
        p = r.primary
        cells = [r.model, r.hardware.get("device", "?"), r.hardware.get("torch_threads") or "-", r.n, r.failed,
                 r.score, *[100 * r.metrics[f"{p}/domain/{d}"] if f"{p}/domain/{d}" in r.metrics else None
                            for d in domains],
                 r.speed.get("mean_s"), r.speed.get("median_s"), r.speed_efficiency, r.cost.get("cost_per_sample"),
                 r.cost_efficiency]
        lines.append("| " + " | ".join(_cell(c, 4 if i in (len(head) - 5, len(head) - 4) else 2)
                                        for i, c in enumerate(cells)) + " |")
    lines += ["", "## How each number is computed", ""]
    lines += [f"- **{k.replace('_', ' ')}** = {v}" for k, v in FORMULAS.items()]
    lines += ["", "## Per model: the numbers in each formula", ""]
    for r in reps:
        sp, c = r.speed, r.cost
        lines += [f"### {r.model}", "", f"- {hardware_line(r.hardware)}",
                  f"- accuracy = {_fmt(r.score)} % over {r.n} images ({r.failed} failed)"
                  + (f"; per domain: " + ", ".join(f"{d} {_fmt(100 * r.metrics[f'{r.primary}/domain/{d}'])} %"
                                                   for d in domains if f"{r.primary}/domain/{d}" in r.metrics)
                     if domains else ""),
                  f"- speed efficiency = {_fmt(r.score)} / {_fmt(sp.get('median_s'), 4)} s = "
                  f"**{_fmt(r.speed_efficiency)}** %/s (mean {_fmt(sp.get('mean_s'), 4)} s / image)",
                  f"- cost: {c.get('price', 'no price given')} = {_fmt(c.get('cost_per_sample'), 6)} $ / image; "
                  f"cost efficiency = {_fmt(r.score)} / {_fmt(c.get('cost_per_sample'), 6)} = "
                  f"**{_fmt(r.cost_efficiency)}** %/$",
                  f"- settings: `{r.settings}`" if r.settings else "- settings: -", f"- prompt: `{r.prompt}`",
                  *_gallery_link(r, cmp.out_dir), ""]
    if cmp.cached:
        from .report import markdown_table

        lines += ["## Cached results (--compare-with)", "", markdown_table(cmp.cached), ""]
    return "\n".join(lines)


def _gallery_link(r: EvalReport, out_dir: str) -> list[str]:
    """The line linking a model's worst-predictions gallery (relative to the combined report)."""
    path = r.files.get("gallery")
    if not path:
        return []
    try:
        rel = Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError:
        rel = path
    return [f"- worst predictions: [{rel}]({rel}) ({len(r.worst)} samples, worst first)"]


def write(cmp: Comparison, out_dir: str | Path, charts: bool = True) -> dict[str, Path]:
    import json

    out = Path(out_dir)
    files = {"json": out / "report.json", "markdown": out / "report.md"}
    if charts:
        rows = [r for r in cmp.rows() if not any(isinstance(v, float) and math.isnan(v) for v in (r.get("accuracy"),))]
        files.update(write_charts(rows, out, title=cmp.task, metric=cmp.reports[0].primary if cmp.reports else ""))
    atomic_write_bytes(files["json"], json.dumps({**cmp.to_dict(), "files": {k: str(v) for k, v in files.items()}},
                                           indent=2, default=str))
    atomic_write_bytes(files["markdown"], markdown(cmp))
    return files


def evaluate_models(models: Sequence[Any], dataset: Any, task: str, *, out_dir: str | Path,
                    price_per_hour: float | None = None, price_per_call: float | None = None,
                    batch_size: int = 8, prompt: str | None = None, predict_options: Mapping[str, Any] | None = None,
                    image_root: str | Path | None = None, strict: bool = True, limit: int | None = None,
                    resume: bool = True, progress: bool = True, compare_with: str | Path | None = None,
                    charts: bool = True, names: Sequence[str | None] | None = None, gallery: int = 12) -> Comparison:
    """Evaluate every model (PaliGemma or a baseline adapter) on the same samples; the first model's
    price rule is `price_per_hour` / `price_per_call`, a baseline's its `price_rule`. Writes the
    combined report to `out_dir` and returns it. Raises `EvalInterrupted` (its report: the model that
    was running) on Ctrl-C / SIGTERM; rerunning resumes every model where it stopped."""
    from .datasets import canonical_task

    task = canonical_task(task)
    ds = load_dataset(dataset, task, image_root=image_root, strict=strict)
    if any(getattr(m, "needs_images", True) for m in models):
        ds = check_images(ds, strict=strict)
    out = Path(out_dir)
    names = list(names or [None] * len(models))
    reports = []
    for i, (model, name) in enumerate(zip(models, names)):
        if hasattr(model, "bind"):
            model.bind(ds)
        pt = getattr(model, "prompt_template", None)
        own = pt(task) if callable(pt) else None  # an adapter's prompt (a chat instruction), checked for the task
        if i == 0:  # the user's model: the user's prompt and prices
            prices = {"price_per_hour": price_per_hour, "price_per_call": price_per_call}
            sub, tmpl = out, prompt or own
        else:
            rule = getattr(model, "price_rule", None)
            prices = rule(price_per_hour) if callable(rule) else {"price_per_hour": price_per_hour}
            sub = out / "baselines" / slug(name or getattr(model, "name", type(model).__name__))
            tmpl = own or prompt
        opts = dict(predict_options or {}) if i == 0 or not hasattr(model, "prompt_template") else {}
        reports.append(evaluate(model, ds, task, out_dir=sub, batch_size=getattr(model, "batch_size", batch_size)
                                if i else batch_size, prompt=tmpl, predict_options=opts, limit=limit, resume=resume,
                                progress=progress, model_name=name, charts=False, strict=strict, gallery=gallery,
                                **prices))
    cached = load_cached_results(compare_with) if compare_with else []
    cmp = Comparison(task, str(ds.path), reports, cached, str(out))
    write(cmp, out, charts=charts)
    return cmp
