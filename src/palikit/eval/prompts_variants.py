"""Prompt sensitivity: run the same evaluation under several wordings of the prompt and report the
metric per variant and its spread (max - min, population standard deviation).

Default variants per task: the task table's `EvalSpec.variants` (templates use the fields of
`runner.prompt_fields`):
- detect / segment: singular vs plural class names ("detect dog ; cat" vs "detect dogs ; cats"), and
  a natural-language request without the keyword ("find the dogs and cats");
- ocr: the task keyword "ocr" vs natural wording ("What does the text say?", "Read the text.");
- vqa / anls / count / exact: "answer en {q}" vs the raw question vs the keyword without a language;
- caption: "caption en" vs "cap en" vs "describe en" vs a natural request.
`langs` adds, for every template holding {lang}, one variant per extra language code
("keyword@fr" -> "answer fr {question}"), to measure language-code sensitivity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

def _default_variants(task: str) -> dict[str, str]:
    from ..tasks.registry import eval_task

    return dict(eval_task(task).eval.variants)


DEFAULT_VARIANTS: dict[str, dict[str, str]] = {t: _default_variants(t) for t in
                                               ("ocr", "vqa", "anls", "count", "exact", "caption", "detect", "segment")}
# ^ the built-in entries' variants at import, for reading; prompt_variants reads the live task table


def prompt_variants(task: str, *, variants: Mapping[str, str] | None = None, langs: Sequence[str] = ()
                    ) -> dict[str, str]:
    """name -> prompt template for `task`: `variants` (or the defaults) plus "<name>@<lang>" copies of
    templates with {lang} for each code in `langs` (the {lang} is filled in; other fields stay)."""
    from .datasets import canonical_task

    base = dict(variants) if variants is not None else _default_variants(canonical_task(task))
    out = dict(base)
    for name, tpl in base.items():
        if "{lang}" in tpl:
            for lg in langs:
                out[f"{name}@{lg}"] = tpl.replace("{lang}", lg)
    return out


@dataclass
class SensitivityReport:
    """Score (primary metric x 100) per variant, the spread and the per-variant `EvalReport`s."""

    task: str
    metric: str
    scores: dict[str, float]
    prompts: dict[str, str]
    reports: dict[str, Any] = field(default_factory=dict, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def spread(self) -> float:
        v = [s for s in self.scores.values() if not np.isnan(s)]
        return float(max(v) - min(v)) if v else float("nan")

    @property
    def std(self) -> float:
        v = [s for s in self.scores.values() if not np.isnan(s)]
        return float(np.std(v)) if v else float("nan")

    @property
    def best(self) -> str:
        return max(self.scores, key=lambda k: -np.inf if np.isnan(self.scores[k]) else self.scores[k])

    @property
    def worst(self) -> str:
        return min(self.scores, key=lambda k: np.inf if np.isnan(self.scores[k]) else self.scores[k])

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "scores": self.scores, "prompts": self.prompts,
                "spread": self.spread, "std": self.std, "best": self.best, "worst": self.worst}

    def markdown(self) -> str:
        lines = [f"# Prompt sensitivity: {self.task} ({self.metric} x100)", "", "| variant | prompt | score |",
                 "|---|---|---|"]
        lines += [f"| {k} | `{self.prompts[k]}` | {v:.2f} |" for k, v in self.scores.items()]
        lines += ["", f"- spread (max - min): **{self.spread:.2f}**; std: {self.std:.2f}",
                  f"- best: `{self.best}`, worst: `{self.worst}`", ""]
        return "\n".join(lines)


def evaluate_prompt_variants(model: Any, dataset: Any, task: str, *, out_dir: str | Path,
                             variants: Mapping[str, str] | None = None, langs: Sequence[str] = (),
                             batch_size: int = 8, charts: bool = True, **evaluate_kwargs: Any) -> SensitivityReport:
    """Evaluate every prompt variant (each in `out_dir/<variant>/`, resumable) and write
    sensitivity.json, sensitivity.md and (charts=True) sensitivity.png in `out_dir`."""
    from ..fileio import atomic_write_bytes
    from .datasets import canonical_task, check_images, load_dataset
    from .runner import evaluate

    task = canonical_task(task)
    strict = evaluate_kwargs.pop("strict", True)
    ds = check_images(load_dataset(dataset, task, image_root=evaluate_kwargs.pop("image_root", None), strict=strict),
                      strict=strict)
    prompts = prompt_variants(task, variants=variants, langs=langs)
    out = Path(out_dir)
    scores, reports = {}, {}
    for name, tpl in prompts.items():
        safe = "".join(c if c.isalnum() or c in "-_@." else "_" for c in name)
        rep = evaluate(model, ds, task, batch_size=batch_size, out_dir=out / safe, prompt=tpl, charts=False,
                       **evaluate_kwargs)
        scores[name], reports[name] = rep.score, rep
    sens = SensitivityReport(task, reports[next(iter(reports))].primary if reports else "", scores, prompts, reports)
    sens.files["json"] = str(atomic_write_bytes(out / "sensitivity.json", json.dumps(sens.to_dict(), indent=2)))
    sens.files["markdown"] = str(atomic_write_bytes(out / "sensitivity.md", sens.markdown()))
    if charts and scores:
        from .report import write_charts

        rows = [{"model": k, "accuracy": v, "source": "variant"} for k, v in scores.items()]
        png = write_charts(rows, out, title=f"prompt sensitivity: {task}").get("accuracy")
        if png is not None:
            final = out / "sensitivity.png"
            png.replace(final)
            sens.files["chart"] = str(final)
    return sens
