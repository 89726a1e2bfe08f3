"""Evaluation harness: metrics (OCR, ANLS, VQAv2, CIDEr-D, counting, COCO mAP, referring
segmentation), a resumable batch runner with speed / cost efficiency, comparison with cached results
of other models, baselines run on the same samples (Tesseract, OpenAI-compatible endpoints, other
checkpoints, COCO results files; `palikit.eval.baselines`), prompt-sensitivity sweeps, and Markdown / PNG reports.

    from palikit.eval import evaluate
    report = evaluate(pg, "ocr.jsonl", "ocr", batch_size=8, out_dir="runs/ocr", price_per_hour=2.5)
    print(report.score, report.speed_efficiency, report.cost_efficiency)
"""

from __future__ import annotations

from . import metrics
from .compare import Comparison, evaluate_models
from .prompts_variants import DEFAULT_VARIANTS, SensitivityReport, evaluate_prompt_variants, prompt_variants
from .report import load_cached_results, markdown_report, save_cached_results, write_charts, write_report
from .datasets import TASKS, EvalDataset, Sample, load_coco, load_dataset, load_jsonl
from .runner import EvalInterrupted, EvalReport, evaluate, load_predictions

__all__ = [
    "metrics", "evaluate", "evaluate_models", "Comparison", "EvalInterrupted", "EvalReport", "EvalDataset", "Sample", "TASKS", "load_dataset", "load_jsonl", "load_coco",
    "load_predictions", "load_cached_results", "save_cached_results", "markdown_report", "write_charts",
    "write_report", "evaluate_prompt_variants", "prompt_variants", "DEFAULT_VARIANTS", "SensitivityReport",
]
