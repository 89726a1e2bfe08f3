"""What quantizing costs in quality: the same evaluation (`palikit eval`) run on the float model and on
its quantized copy, every metric side by side with the difference, and how many greedy answers stay
token-for-token the same. `palikit quantize` writes the result into the model card.

An evaluation is a list of `QualityTask`s: a user's data set and task (`--eval DATA --task T`), or the
bundled demo model's test split, regenerated from its seed, with all six of its tasks (`demo_tasks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the demo's test split: JSONL tasks -> palikit eval task; detect/segment use the COCO file
DEMO_JSONL_TASKS = {"ocr": "exact", "count": "count", "color": "exact", "caption": "exact"}
DEMO_COCO_TASKS = {"detect": 64, "segment": 96}  # -> max_new_tokens
DEMO_PRIMARY = {"ocr": "exact_match", "count": "accuracy", "color": "exact_match", "caption": "exact_match",
                "detect": "map50", "segment": "miou"}


@dataclass
class QualityTask:
    name: str  # row label
    dataset: Any  # a path or an EvalDataset
    task: str  # palikit eval task
    primary: str | None = None  # the metric the table shows (None: the report's primary)
    predict_options: dict = field(default_factory=lambda: {"max_new_tokens": 64})
    limit: int | None = None  # only the first N samples


def demo_tasks(folder: str | Path, n_images: int, mask_codec) -> list[QualityTask]:
    """Write the demo generator's test split (the first `n_images`, deterministic) under `folder`
    and return its six tasks."""
    from ..demo import shapes
    from ..demo.splits import write_split
    from ..tasks.mask_codec import tokens_from_mask
    from .datasets import load_coco

    folder = Path(folder)
    data = write_split(shapes, folder, "test", n_images, 112,
                       seg_fn=lambda s: tokens_from_mask(mask_codec, s.mask, s.box))
    rows: dict[str, list[str]] = {}
    for line in (data / "test.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["image"] = str((data / row["image"]).resolve())
            rows.setdefault(row["task"], []).append(json.dumps(row))
    tasks = []
    for name, metric_task in DEMO_JSONL_TASKS.items():
        path = folder / f"test_{name}.jsonl"
        path.write_text("\n".join(rows[name]) + "\n")
        tasks.append(QualityTask(name, path, metric_task, DEMO_PRIMARY[name], {"max_new_tokens": 32}))
    for name, max_new in DEMO_COCO_TASKS.items():
        ds = load_coco(data / "test_coco.json", name, image_root=data)
        tasks.append(QualityTask(name, ds, name, DEMO_PRIMARY[name], {"max_new_tokens": max_new}))
    return tasks


def _texts(pred_path: Path) -> dict[str, str]:
    out = {}
    for line in pred_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["id"]] = row.get("text")
    return out


def compare_quality(models: dict[str, Any], tasks: list[QualityTask], out_dir: str | Path, *,
                    reference: str = "none", batch_size: int = 16, progress: bool = False) -> dict:
    """Evaluate every model (`{"none": float_pg, "int8": quantized_pg, ...}`) on every task.
    Returns {"tasks": {task: {model: {metric: value}}}, "primary": {task: metric},
    "agreement": {model: {task: share of answers equal to the reference's}}, "n": {task: samples}}."""
    from .runner import evaluate

    out_dir = Path(out_dir)
    result: dict = {"tasks": {}, "primary": {}, "agreement": {}, "n": {}}
    texts: dict[str, dict[str, dict[str, str]]] = {}
    for t in tasks:
        for label, pg in models.items():
            rep = evaluate(pg, t.dataset, t.task, out_dir=out_dir / label / t.name, batch_size=batch_size,
                           resume=False, progress=progress, charts=False, predict_options=t.predict_options,
                           model_name=label, limit=t.limit)
            result["tasks"].setdefault(t.name, {})[label] = {k: v for k, v in rep.metrics.items()
                                                             if isinstance(v, (int, float))}
            result["primary"][t.name] = t.primary or rep.primary
            result["n"][t.name] = rep.n
            texts.setdefault(label, {})[t.name] = _texts(out_dir / label / t.name / "predictions.jsonl")
    for label in models:
        if label == reference:
            continue
        agree = {}
        for name, ref in texts[reference].items():
            mine = texts[label][name]
            agree[name] = sum(mine.get(i) == txt for i, txt in ref.items()) / max(len(ref), 1)
        total = sum(len(texts[reference][n]) for n in agree)
        agree["all"] = sum(agree[n] * len(texts[reference][n]) for n in agree) / max(total, 1)
        result["agreement"][label] = agree
    return result


def quality_table(result: dict, reference: str = "none") -> str:
    """Markdown: one row per task, the primary metric per model and each model's difference."""
    labels = list(next(iter(result["tasks"].values())))
    others = [m for m in labels if m != reference]
    head = ["task", "metric", "n", *labels, *(f"{m} - {reference}" for m in others), *(f"{m} same answers" for m in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, by_model in result["tasks"].items():
        metric = result["primary"][task]
        vals = [by_model[m].get(metric, float("nan")) for m in labels]
        ref = by_model[reference].get(metric, float("nan"))
        diffs = [f"{by_model[m].get(metric, float('nan')) - ref:+.3f}" for m in others]
        agree = [f"{result['agreement'][m][task]:.1%}" for m in others]
        lines.append("| " + " | ".join([task, metric, str(result["n"][task]), *(f"{v:.3f}" for v in vals), *diffs,
                                        *agree]) + " |")
    if others:
        cells = ["all answers", "", "", *[""] * (len(labels) + len(others)),
                 *(f"{result['agreement'][m]['all']:.1%}" for m in others)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def max_metric_drop(result: dict, label: str, reference: str = "none") -> float:
    """The largest drop (reference - label) over every numeric metric of every task."""
    drops = []
    for by_model in result["tasks"].values():
        for metric, ref in by_model[reference].items():
            if metric in by_model[label] and ref >= 0:  # COCO's -1 = "no such objects"
                drops.append(ref - by_model[label][metric])
    return max(drops, default=0.0)
