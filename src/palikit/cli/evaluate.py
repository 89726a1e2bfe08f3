"""`palikit eval`: accuracy, speed efficiency and cost efficiency of a model on a data set, with an
optional prompt-sensitivity sweep; writes predictions JSONL, report.md/json and PNG charts."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command("eval")
def evaluate(
    dataset: Path = typer.Argument(..., help="JSONL (ocr/vqa/anls/caption/count/exact) or COCO json (detect/segment)."),
    task: str = typer.Option(..., help="ocr | vqa | anls | caption | count | exact | detect | segment"),
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hub id (default: bundled demo)."),
    out: Path = typer.Option(Path("out/eval"), help="Output folder (predictions.jsonl, report.md, charts)."),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    price_per_hour: float = typer.Option(None, help="Hardware price per hour, for cost efficiency."),
    price_per_call: float = typer.Option(None, help="Price per call (hosted models), for cost efficiency."),
    compare_with: Path = typer.Option(None, help="Cached results of other models (JSON/CSV) shown side by side."),
    prompt: str = typer.Option(None, help="Prompt template overriding the task's, e.g. 'answer en {question}'."),
    limit: int = typer.Option(None, help="Only the first N samples."),
    sensitivity: bool = typer.Option(False, help="Also run the prompt-variant sweep and report the spread."),
    fresh: bool = typer.Option(False, help="Ignore saved predictions instead of resuming."),
    max_new_tokens: int = typer.Option(64),
):
    """Evaluate; an interrupted run resumes from the saved predictions."""
    from ..eval import evaluate as run_eval
    from ..eval import evaluate_prompt_variants
    from .predict import load_model

    pg = load_model(model, device, dtype, None)
    common = dict(batch_size=batch_size, price_per_hour=price_per_hour, price_per_call=price_per_call,
                  predict_options={"max_new_tokens": max_new_tokens}, limit=limit, model_name=model or "demo")
    report = run_eval(pg, dataset, task, out_dir=out, resume=not fresh, prompt=prompt, compare_with=compare_with,
                      **common)
    typer.echo(f"{report.task}: score {report.score:.2f}, speed efficiency {report.speed_efficiency:.2f}/s"
               + (f", cost efficiency {report.cost_efficiency:.1f}/$" if report.cost_efficiency else "")
               + f" -> {out / 'report.md'}")
    if sensitivity:
        sens = evaluate_prompt_variants(pg, dataset, task, out_dir=out / "sensitivity", **common)
        typer.echo(sens.markdown())
