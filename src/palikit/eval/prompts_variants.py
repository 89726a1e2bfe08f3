"""Prompt sensitivity: run the same evaluation under several wordings of the prompt and report the
metric per variant and its spread (max - min, population standard deviation).

The sweep (`prompt_variants`), each variant of a kind (`variant_kind`):
- "default": the task's own template (`EvalSpec.template`), the baseline every difference is from;
- "wording": the task table's `EvalSpec.variants` (templates use the fields of `runner.prompt_fields`):
  detect / segment singular vs plural class names ("detect dog ; cat" vs "detect dogs ; cats") and
  a natural-language request without the keyword ("find the dogs and cats"); ocr the keyword vs
  natural wording ("What does the text say?"); vqa / anls / count / exact "answer en {q}" vs the raw
  question vs the keyword without a language; caption "caption en" vs "cap en" vs "describe en";
- "case" (`case=True`): the default with its keyword capitalised ("Detect dog ; cat", "Ocr") and
  upper-cased ("DETECT DOG ; CAT", "OCR"), and detect / segment class names capitalised ("detect Dog");
- "separator" (`separators=True`, templates with labels): "dog, cat", "dog and cat", "dog;cat";
- "language": "<name>@<code>" copies of templates with {lang} for each code in `langs`;
- "user": templates the user gives (`palikit eval --variant "detect {labels}"`, repeatable).

The report (`SensitivityReport`) is one table, a row per variant; `columns` holds any further
per-variant figures as named columns (e.g. a constrained-decoding score), rendered after the score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("default", "wording", "case", "separator", "language", "user")
_LABEL_FIELD = re.compile(r"\{labels(?:_singular|_plural)?\}")


def _default_variants(task: str) -> dict[str, str]:
    from ..tasks.registry import eval_task

    return dict(eval_task(task).eval.variants)


DEFAULT_VARIANTS: dict[str, dict[str, str]] = {t: _default_variants(t) for t in
                                               ("ocr", "vqa", "anls", "count", "exact", "caption", "detect", "segment")}
# ^ the built-in entries' variants at import, for reading; prompt_variants reads the live task table


def _literal(template: str, fn) -> str:
    """`template` with `fn` applied to its literal text only (the {fields} stay as they are)."""
    return "".join(part if part.startswith("{") else fn(part) for part in re.split(r"(\{[^{}]*\})", template))


def case_variants(template: str) -> dict[str, str]:
    """Case variants of a template whose text starts with a keyword: "case-capitalised" ("Detect
    {labels}"), "case-upper" ("DETECT {labels_upper}") and, with a labels field, "case-labels"
    ("detect {labels_title}"). None for a template that starts with a field (a raw question)."""
    if not template[:1].isalpha():
        return {}
    out = {"case-capitalised": template[0].upper() + template[1:],
           "case-upper": _LABEL_FIELD.sub("{labels_upper}", _literal(template, str.upper))}
    if _LABEL_FIELD.search(template):
        out["case-labels"] = _LABEL_FIELD.sub("{labels_title}", template)
    return {k: v for k, v in out.items() if v != template}


def separator_variants(template: str) -> dict[str, str]:
    """The labels joined otherwise than PaliGemma's " ; ": "sep-comma", "sep-and", "sep-tight"."""
    if not _LABEL_FIELD.search(template):
        return {}
    return {f"sep-{k}": _LABEL_FIELD.sub(f"{{labels_{k}}}", template) for k in ("comma", "and", "tight")}


def variant_kind(name: str) -> str:
    """The kind of a variant from its name (module docstring)."""
    if name == "default":
        return "default"
    if "@" in name:
        return "language"
    for prefix, kind in (("case-", "case"), ("sep-", "separator"), ("user", "user")):
        if name.startswith(prefix):
            return kind
    return "wording"


def parse_user_variants(specs: Sequence[str]) -> dict[str, str]:
    """`--variant` values -> {name: template}: "TEMPLATE" (named user1, user2, ...) or "NAME=TEMPLATE"
    (NAME: letters, digits, - and _; stored as "user-NAME"). Templates are checked (`check_template`)."""
    from .runner import check_template

    out: dict[str, str] = {}
    for i, spec in enumerate(specs, 1):
        m = re.match(r"^([A-Za-z0-9_-]+)=(.*)$", spec)
        name, template = (f"user-{m.group(1)}", m.group(2)) if m else (f"user{i}", spec)
        if not template.strip():
            raise ValueError(f"--variant {spec!r} has no prompt template; e.g. --variant 'detect {{labels}}'")
        if name in out:
            raise ValueError(f"--variant names {name!r} twice")
        out[name] = check_template(template)
    return out


def prompt_variants(task: str, *, variants: Mapping[str, str] | None = None, langs: Sequence[str] = (),
                    case: bool = False, separators: bool = False, user: Mapping[str, str] | None = None,
                    default: bool = False) -> dict[str, str]:
    """name -> prompt template for `task`: (`default`) the task's template as "default", `variants` (or
    the task table's wordings), (`case`) and (`separators`) variants of the default template, "<name>@<lang>"
    copies of templates with {lang} for each code in `langs`, then `user` ones. A template already in the
    sweep is not run twice (the first name keeps it)."""
    from .datasets import canonical_task
    from .runner import default_prompt

    task = canonical_task(task)
    base_tpl = default_prompt(task)
    out: dict[str, str] = {"default": base_tpl} if default else {}
    out.update(dict(variants) if variants is not None else _default_variants(task))
    for name, tpl in list(out.items()):
        if "{lang}" in tpl:
            for lg in langs:
                out[f"{name}@{lg}"] = tpl.replace("{lang}", lg)
    if case:
        out.update(case_variants(base_tpl))
    if separators:
        out.update(separator_variants(base_tpl))
    out.update(user or {})
    seen: dict[str, str] = {}
    return {k: v for k, v in out.items() if seen.setdefault(v, k) == k}


@dataclass
class SensitivityReport:
    """Score (primary metric x 100) per variant, the spread and the per-variant `EvalReport`s. `columns`:
    further per-variant figures {column name: {variant: value}}, one table column each."""

    task: str
    metric: str
    scores: dict[str, float]
    prompts: dict[str, str]
    reports: dict[str, Any] = field(default_factory=dict, repr=False)
    files: dict[str, str] = field(default_factory=dict)
    columns: dict[str, dict[str, float]] = field(default_factory=dict)

    def _valid(self) -> list[float]:
        return [s for s in self.scores.values() if not np.isnan(s)]

    @property
    def spread(self) -> float:
        v = self._valid()
        return float(max(v) - min(v)) if v else float("nan")

    @property
    def std(self) -> float:
        v = self._valid()
        return float(np.std(v)) if v else float("nan")

    @property
    def best(self) -> str:
        return max(self.scores, key=lambda k: -np.inf if np.isnan(self.scores[k]) else self.scores[k])

    @property
    def worst(self) -> str:
        return min(self.scores, key=lambda k: np.inf if np.isnan(self.scores[k]) else self.scores[k])

    def spread_by_kind(self) -> dict[str, float]:
        """max - min over the default and the variants of each kind (case, separator, ...)."""
        base = self.scores.get("default")
        out = {}
        for kind in KINDS[1:]:
            v = [s for k, s in self.scores.items() if variant_kind(k) == kind and not np.isnan(s)]
            v += [base] if v and base is not None and not np.isnan(base) else []
            if len(v) > 1:
                out[kind] = float(max(v) - min(v))
        return out

    def column_spreads(self) -> dict[str, float]:
        """max - min of each further column (e.g. "constrained")."""
        out = {}
        for name, col in self.columns.items():
            v = [x for x in col.values() if x is not None and not np.isnan(x)]
            if v:
                out[name] = float(max(v) - min(v))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "scores": self.scores, "prompts": self.prompts,
                "kinds": {k: variant_kind(k) for k in self.scores}, "columns": self.columns,
                "failed": {k: r.failed for k, r in self.reports.items()},
                "spread": self.spread, "std": self.std, "spread_by_kind": self.spread_by_kind(),
                "column_spreads": self.column_spreads(), "best": self.best,
                "worst": self.worst}

    def markdown(self) -> str:
        from .report import _fmt

        base = self.scores.get("default")
        head = ["variant", "kind", "prompt", "score", "vs default", *self.columns, "failed"]
        lines = [f"# Prompt sensitivity: {self.task} ({self.metric} x100)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k, v in self.scores.items():
            delta = "" if base is None or k == "default" or np.isnan(v) else f"{v - base:+.2f}"
            rep = self.reports.get(k)
            cells = [k, variant_kind(k), f"`{self.prompts[k]}`", _fmt(v), delta,
                     *[_fmt(col.get(k)) for col in self.columns.values()], str(rep.failed if rep else "–")]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"- spread (max - min): **{self.spread:.2f}**; std: {self.std:.2f}",
                  *[f"- spread of the {name} column: **{s:.2f}**" for name, s in self.column_spreads().items()],
                  f"- best: `{self.best}`, worst: `{self.worst}`"]
        lines += [f"- spread of the {kind} variants (with the default): {s:.2f}"
                  for kind, s in self.spread_by_kind().items()]
        if self.files.get("chart"):
            lines += ["", f"![prompt sensitivity]({Path(self.files['chart']).name})"]
        return "\n".join(lines + [""])

    def summary_lines(self, rel: str) -> list[str]:
        """report.md's section linking this sweep (`rel`: the sweep's folder relative to report.md)."""
        lines = ["## Prompt sensitivity", "",
                 f"{len(self.scores)} prompt variants ([{rel}/sensitivity.md]({rel}/sensitivity.md)): spread "
                 f"**{self.spread:.2f}** ({self.metric} x100), best `{self.best}` "
                 f"`{self.prompts[self.best]}` {self.scores[self.best]:.2f}, worst `{self.worst}` "
                 f"`{self.prompts[self.worst]}` {self.scores[self.worst]:.2f}."]
        lines += [f"Spread of the {name} column: **{s:.2f}**." for name, s in self.column_spreads().items()]
        by_kind = self.spread_by_kind()
        if by_kind:
            lines += ["", "Spread by kind (with the default): " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items())]
        if self.files.get("chart"):
            lines += ["", f"![prompt sensitivity]({rel}/{Path(self.files['chart']).name})"]
        return lines


def evaluate_prompt_variants(model: Any, dataset: Any, task: str, *, out_dir: str | Path,
                             variants: Mapping[str, str] | None = None, langs: Sequence[str] = (),
                             case: bool = True, separators: bool = True, user: Mapping[str, str] | None = None,
                             batch_size: int = 8, charts: bool = True, **evaluate_kwargs: Any) -> SensitivityReport:
    """Evaluate the default prompt and every variant (`prompt_variants`; each in `out_dir/<variant>/`,
    resumable, its progress bar named after it) and write sensitivity.json, sensitivity.md and
    (charts=True) sensitivity.png in `out_dir`."""
    from ..fileio import atomic_write_bytes
    from .datasets import canonical_task, check_images, load_dataset
    from .runner import evaluate

    task = canonical_task(task)
    strict = evaluate_kwargs.pop("strict", True)
    ds = check_images(load_dataset(dataset, task, image_root=evaluate_kwargs.pop("image_root", None), strict=strict),
                      strict=strict)
    prompts = prompt_variants(task, variants=variants, langs=langs, case=case, separators=separators, user=user,
                              default=True)
    out = Path(out_dir)
    scores, reports, constrained = {}, {}, {}
    modes = _grammar_modes(model, task, evaluate_kwargs.pop("predict_options", None))
    for i, (name, tpl) in enumerate(prompts.items(), 1):
        safe = "".join(c if c.isalnum() or c in "-_@." else "_" for c in name)
        label = f"sensitivity {i}/{len(prompts)} {name} ({tpl})"
        for suffix, opts in modes:
            rep = evaluate(model, ds, task, batch_size=batch_size, out_dir=out / (safe + suffix), prompt=tpl,
                           charts=False, progress_label=label + suffix.replace("-", " "), predict_options=opts,
                           **evaluate_kwargs)
            if suffix:
                constrained[name] = rep.score
            else:
                scores[name], reports[name] = rep.score, rep
    sens = SensitivityReport(task, reports[next(iter(reports))].primary if reports else "", scores, prompts, reports,
                             columns={"constrained": constrained} if constrained else {})
    if charts and scores:
        sens.files["chart"] = str(sensitivity_chart(sens, out / "sensitivity.png"))
    sens.files["json"] = str(atomic_write_bytes(out / "sensitivity.json", json.dumps(sens.to_dict(), indent=2)))
    sens.files["markdown"] = str(atomic_write_bytes(out / "sensitivity.md", sens.markdown()))
    return sens


def _grammar_modes(model: Any, task: str, options: Mapping[str, Any] | None) -> list[tuple[str, dict]]:
    """(out_dir suffix, predict options) per run of a variant: detect / segment on a PaliGemma run twice,
    the raw model (the score) and constrained to the task's grammar whatever the wording (the
    "constrained" column, tasks/constrain.py); other tasks and models once, as given."""
    import sys

    opts = dict(options or {})
    api = sys.modules.get("palikit.api")
    if task not in ("detect", "segment") or api is None or not isinstance(model, api.PaliGemma):
        return [("", opts)]
    return [("", {**opts, "constrained": False}), ("-constrained", {**opts, "constrained": task})]


def sensitivity_chart(sens: SensitivityReport, path: Path) -> Path:
    """One bar per variant, labelled with its prompt, on the task's metric axis ("map x100")."""
    from .report import bar_chart

    names = [f"{k}: {sens.prompts[k]}"[:48] for k in sens.scores]
    colors = ["tab:orange" if k == "default" else "tab:blue" for k in sens.scores]
    return bar_chart(names, [sens.scores[k] for k in sens.scores], path, xlabel=f"{sens.metric} x100 (score)",
                     title=f"prompt sensitivity: {sens.task} (spread {sens.spread:.2f})", colors=colors,
                     size=(8, max(4.5, 0.3 * len(names) + 1.2)))
