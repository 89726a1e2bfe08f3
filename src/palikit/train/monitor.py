"""Is the run learning? At every evaluation the model answers a fixed validation sample (greedy) and
the answers are scored through `palikit.eval`'s metrics, by task:

| examples (JSONL `task` field or prefix)    | metric key       | how                                          |
|--------------------------------------------|------------------|----------------------------------------------|
| detect / segment                           | `detect_map`, `detect_map50` | COCO box mAP (`eval.metrics_tasks`), ground truth = the boxes in the target suffix |
| caption / describe                         | `caption_cider`  | CIDEr-D against the target                   |
| everything else (ocr, vqa, count, ...)     | `exact_match`    | case/space-normalised exact match            |

Plain warnings, each saying what to try that the run does not already do:
- predictions collapse (one answer for more than `collapse_warn` of a task's sample while the targets
  are more varied);
- val loss stops improving for `plateau_patience` evaluations;
- overfitting: the train loss (mean of the steps since the last evaluation) is far below the val loss
  (`OVERFIT_RATIO`) while val loss rises from its best;
- a task metric stuck at 0 for `plateau_patience` evaluations, with the pre-flight's warnings (the
  reasons palikit found before the run: words the tokenizer spells piece by piece, boxes off the
  model's grid...) repeated.
`summary()` is the run's last line: steps, best val loss, each task metric first -> last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from .data import Example

DETECT, CAPTION, EXACT = "detect", "caption", "exact"
TASK_KEYS = ("exact_match", "detect_map", "detect_map50", "caption_cider")
MIN_IMPROVEMENT = 1e-3  # relative: val loss must drop by 0.1 % to count as improving
OVERFIT_RATIO = 1.3  # val loss / recent train loss above this, with val loss up 2 % from its best: overfitting


def task_kind(ex: Example) -> str:
    task = (ex.task or "").lower()
    prefix = ex.prefix.strip().lower()
    if task in ("detect", "detection", "segment", "segmentation") or prefix.startswith(("detect ", "segment ")):
        return DETECT
    if task in ("caption", "captions", "describe") or prefix.startswith(("caption", "describe")):
        return CAPTION
    return EXACT


def spread_sample(examples: Sequence[Example], n: int) -> list[Example]:
    """`n` examples evenly spread over the list (all of them when it is shorter)."""
    if len(examples) <= n:
        return list(examples)
    return [examples[i * len(examples) // n] for i in range(n)]


@torch.no_grad()
def generate_answers(model, collator, examples: Sequence[Example], device, batch_size: int = 8) -> list[str]:
    """Greedy answers of `model` to the examples' prefixes (palikit's engine), as text."""
    from ..engine import Engine, GenerationOptions, Request

    tok = collator.tokenizer
    longest = max(sum(tok.encode_prompt(ex.prefix, ex.suffix).loss_mask) for ex in examples)  # suffix + EOS
    opts = GenerationOptions(max_new_tokens=min(longest + 4, 512))
    engine = Engine(model, eos_ids=(tok.eos_id,))
    w = model.vision_tower.embeddings.patch_embedding.weight
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        feats = model.embed_images(collator.pixels(chunk).to(device, w.dtype))  # [B, N, H]
        reqs = [Request(text_ids=tok.encode_prompt(ex.prefix).ids, image_features=f) for ex, f in zip(chunk, feats)]
        out += [tok.decode(g.tokens) for g in engine.generate(reqs, opts)]
    return out


def _image_size(path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def score(kind: str, examples: Sequence[Example], answers: Sequence[str]) -> dict[str, float]:
    """The task metric(s) of one kind of example through `palikit.eval.metrics_tasks.corpus_metrics`."""
    from ..eval.metrics_tasks import corpus_metrics
    from ..eval.datasets import Sample

    samples = [Sample(str(i), str(ex.image), ex.prefix, [ex.suffix], meta={"image_id": i})
               for i, ex in enumerate(examples)]
    recs: dict[str, dict[str, Any]] = {s.id: {"id": s.id, "text": a} for s, a in zip(samples, answers)}
    if kind == EXACT:
        return {"exact_match": corpus_metrics("exact", recs, samples)["exact_match"]}
    if kind == CAPTION:
        return {"caption_cider": corpus_metrics("caption", recs, samples)["cider"]}
    from ..tasks.parse import parse_detections

    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    cats: dict[str, int] = {}
    for s, ex, a in zip(samples, examples, answers):
        size = _image_size(ex.image)
        coco["images"].append({"id": s.meta["image_id"], "width": size[0], "height": size[1]})
        for d in parse_detections(ex.suffix, size).detections:
            cid = cats.setdefault(d.label, len(cats) + 1)
            x0, y0, x1, y1 = d.box
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": s.meta["image_id"],
                                        "category_id": cid, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                        "area": max((x1 - x0) * (y1 - y0), 1e-6), "iscrowd": 0})
        recs[s.id]["detections"] = [{"label": d.label, "box": list(d.box), "score": d.score}
                                    for d in parse_detections(a, size).detections]
    if not coco["annotations"]:
        return {}  # no boxes in any target of the sample: mAP is undefined
    coco["categories"] = [{"id": i, "name": n} for n, i in cats.items()]
    m = corpus_metrics("detect", recs, samples, coco)
    return {"detect_map": m["map"], "detect_map50": m["map50"]}


def remedies(config) -> str:
    """What to try against a run that does not learn, leaving out what `config` already does."""
    tips = ["more steps", "a higher lr" + (f" (now {config.lr:g})" if config is not None else "")]
    if config is None or config.mode != "full":
        tips.append("mode=full")
    if config is None or (config.mode in ("lora", "qlora") and config.lora_targets != "all-linear"):
        tips.append("lora_targets=all-linear")
    if config is not None and (config.freeze_vision or config.freeze_decoder):
        tips.append("unfreezing the " + ("vision tower" if config.freeze_vision else "decoder"))
    return ", ".join(tips[:-1]) + " or " + tips[-1]


def collapse_warning(kind: str, examples: Sequence[Example], answers: Sequence[str], fraction: float,
                     config=None) -> str | None:
    """A warning when one answer covers more than `fraction` of the sample and the targets do not."""
    if fraction <= 0 or len(answers) < 4:
        return None
    top, n = Counter(answers).most_common(1)[0]
    _, ref_n = Counter(ex.suffix for ex in examples).most_common(1)[0]
    if n / len(answers) <= fraction or ref_n >= n:
        return None
    distinct = len({ex.suffix for ex in examples})
    return (f"predictions collapsed ({kind} examples): {n} of {len(answers)} validation answers are {top!r} while "
            f"the targets hold {distinct} different answers: the model answers the same whatever the image. "
            f"Try {remedies(config)}.")


def early_stop_due(history: Sequence[dict], best: dict, step: int, patience: int) -> bool:
    """Has `best["metric"]` gone `patience` evaluations (the last one at `step`) without improving?"""
    evals = [h for h in history if best["metric"] in h]
    return bool(evals) and evals[-1]["step"] == step and sum(h["step"] > best["step"] for h in evals) >= patience


class LearningMonitor:
    """Task metric + warnings over the evaluations of one run (`history` holds what it measured)."""

    def __init__(self, val_set: Sequence[Example], n_samples: int, collapse_warn: float, plateau_patience: int,
                 config=None):
        self.sample = spread_sample(val_set, n_samples)
        self.collapse_warn = collapse_warn
        self.patience = plateau_patience
        self.config = config  # the run's TrainConfig: warnings never suggest what it already does
        self.preflight = None  # the run's pre-flight report: its warnings explain a metric stuck at 0
        self.val_losses: list[tuple[int, float]] = []
        self.history: list[dict[str, float]] = []

    def restore(self, history: Sequence[dict]) -> None:
        """Pick up the evaluations of a resumed run (its trainer history) for the warnings and summary."""
        evals = [h for h in history if "val_loss" in h]
        self.val_losses = [(h["step"], h["val_loss"]) for h in evals]
        self.history = [{k: v for k, v in h.items() if k in TASK_KEYS} for h in evals]

    def task_metrics(self, model, collator, device) -> tuple[dict[str, float], list[str]]:
        """(metrics, warnings) for the sample; the model is left in eval mode. A failure to generate
        (an exotic model or tokenizer) turns the task metric off with a warning instead of ending the run."""
        if not self.sample:
            return {}, []
        model.eval()
        try:
            answers = generate_answers(model, collator, self.sample, device)
        except Exception as e:  # noqa: BLE001 - reported, and training goes on without the metric
            self.sample = []
            return {}, [f"task metric turned off: generating validation answers failed ({type(e).__name__}: {e}); "
                        "val_loss is still reported (task_metric=false hides this warning)"]
        metrics: dict[str, float] = {}
        warnings = []
        for kind in (EXACT, DETECT, CAPTION):
            idx = [i for i, ex in enumerate(self.sample) if task_kind(ex) == kind]
            if not idx:
                continue
            exs, ans = [self.sample[i] for i in idx], [answers[i] for i in idx]
            metrics.update(score(kind, exs, ans))
            if (w := collapse_warning(kind, exs, ans, self.collapse_warn, self.config)) is not None:
                warnings.append(w)
        self.history.append(metrics)
        warnings += self.stuck_warnings()
        return metrics, warnings

    def stuck_warnings(self) -> list[str]:
        """One warning when task metrics have been 0 for the last `patience` evaluations (said when the run
        reaches `patience`, then every `patience` evaluations), with the pre-flight's reasons."""
        if self.patience <= 0 or not self.history:
            return []
        stuck, run = [], 0
        for key in (k for k in TASK_KEYS if k in self.history[-1]):
            n = 0
            for h in reversed(self.history):
                if h.get(key, 1.0) != 0.0:
                    break
                n += 1
            if n >= self.patience:
                stuck.append(key)
                run = max(run, n)
        if not stuck or run % self.patience:
            return []
        why = ""
        if self.preflight is not None and self.preflight.warnings:
            why = " The pre-flight warned: " + " ".join(f"{w.check}: {w.finding}." for w in self.preflight.warnings)
        return [f"{' and '.join(stuck)} {'has' if len(stuck) == 1 else 'have'} been 0 for {run} evaluations: the "
                f"model does not give one right answer.{why} Try {remedies(self.config)}, or check that this base "
                "model can learn the data at all (palikit check)."]

    def overfit_warning(self, step: int, val_loss: float, train_losses: Sequence[float]) -> str | None:
        """Train loss far below val loss while val loss rises from its best: the model learns the training
        examples, not the task."""
        if not train_losses or len(self.val_losses) < 2:
            return None
        train = sum(train_losses) / len(train_losses)
        best = min(v for _, v in self.val_losses)
        if not (val_loss > OVERFIT_RATIO * train and val_loss > best * 1.02):
            return None
        c = self.config
        tips = ["early_stopping_patience=3" if c is None or not c.early_stopping_patience else None,
                "fewer steps", "more data", "a lower lr" + (f" (now {c.lr:g})" if c is not None else ""),
                "mode=lora" if c is not None and c.mode == "full" else None,
                "weight_decay=0.01" if c is not None and not c.weight_decay else None]
        return (f"overfitting: train loss {train:.4f} against val loss {val_loss:.4f} at step {step} (best val "
                f"{best:.4f}); the model is memorising the training examples. final/ keeps the best checkpoint "
                f"(keep_best); try {', '.join(t for t in tips if t)}.")

    def plateau_warning(self, step: int, val_loss: float) -> str | None:
        """A warning when val loss has not improved by 0.1 % for `patience` evaluations (repeated every
        `patience` evaluations while it lasts)."""
        self.val_losses.append((step, val_loss))
        if self.patience <= 0:
            return None
        best_i, best_v = 0, self.val_losses[0][1]
        for i, (_, v) in enumerate(self.val_losses):
            if v < best_v * (1 - MIN_IMPROVEMENT):
                best_i, best_v = i, v
        since = len(self.val_losses) - 1 - best_i
        if since == 0 or since % self.patience:
            return None
        trend = "rising" if val_loss > best_v * (1 + 0.05) else "flat"
        return (f"val loss has not improved for {since} evaluations ({trend}): best {best_v:.4f} at step "
                f"{self.val_losses[best_i][0]}, now {val_loss:.4f} at step {step}. The run is not learning from "
                "here: check the data, lower / raise lr, or stop.")

    def summary(self, steps: int, train_loss: float | None) -> str:
        parts = [f"{steps} steps"]
        if train_loss is not None:
            parts.append(f"last train loss {train_loss:.4f}")
        if self.val_losses:
            step, best = min(self.val_losses, key=lambda sv: sv[1])
            parts.append(f"best val_loss {best:.4f} (step {step})")
        else:
            parts.append("no val_data, so no val loss or task metric")
        keys = list(dict.fromkeys(k for h in self.history for k in h))
        for k in keys:
            values = [h[k] for h in self.history if k in h]
            parts.append(f"{k} {values[0]:.3f} -> {values[-1]:.3f}")
        return "summary: " + ", ".join(parts)
