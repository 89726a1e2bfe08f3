"""`palikit batch`: resumable batch inference on Ray Data (local Ray by default, or a cluster).

A rerun into the same folder skips what was written for the same task, prompt, options and model
(another task runs in full); `--retry-failed` reruns inputs recorded with an error. Ctrl-C / SIGTERM
keeps the parts written so far and exits 130 / 143 with the command to resume."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command()
def batch(
    input: Path = typer.Option(..., "--input", "-i", help="Folder of images, .jsonl (image, id, prompt...) or .parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for part-*.jsonl / part-*.parquet results."),
    task: str = typer.Option(..., help="ocr | caption | describe | detect | segment | answer | predict"),
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hub id (default: bundled demo)."),
    adapter: list[str] = typer.Option(None, "--adapter", help="LoRA adapter folder (PEFT format) merged into --model; "
                                      "or NAME=PATH (repeatable): every input runs on each adapter (served unmerged "
                                      "side by side, one batch), one output row per input and adapter with an "
                                      "'adapter' column."),
    quantize: str = typer.Option(None, "--quantize", help="int8 or int4: every worker quantizes the weights at load."),
    labels: str = typer.Option(None, help="Classes for detect/segment, e.g. 'dog ; car' (commas also separate when "
                               "there is no ';', as in `palikit detect`)."),
    question: str = typer.Option(None, help="Question for the answer task."),
    prompt: str = typer.Option(None, help="Prompt for the predict task."),
    lang: str = typer.Option("en", help="Language code for caption/answer."),
    format: str = typer.Option("jsonl", help="jsonl or parquet."),
    batch_size: int = typer.Option(8, help="Images per model call."),
    workers: int = typer.Option(1, help="Model replicas (one per GPU when GPUs are there)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    address: str = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
    max_new_tokens: int = typer.Option(64, help="Maximum tokens per answer."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again the inputs an earlier run recorded "
                                      "with an error (e.g. after fixing the files)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Run one task over many images; a rerun skips what is already written for this task and options."""
    from ..distributed.ray_batch import run_batch
    from .predict import default_model
    from .serve import split_adapters

    adapter, named = split_adapters(adapter or [])  # a bad value: ValueError, one 'error:' line (as eval, serve)
    summary = run_batch(
        input, output, task, default_model(model),
        labels=labels, question=question, prompt=prompt,  # split by the one label rule (tasks.labels), per row
        lang=lang, fmt=format, batch_size=batch_size, num_workers=workers, device=device, address=address,
        max_new_tokens=max_new_tokens, retry_failed=retry_failed, progress=progress, adapter=adapter,
        quantize=quantize, adapters=named,
    )
    line = (f"{task}: {summary.written} written ({summary.failed} failed inputs recorded with their error), "
            f"{summary.skipped} already done, {summary.images_per_s:.1f} images/s -> {summary.output}")
    if summary.adapters:  # one column per adapter: what this run wrote for each
        line += "\n" + "  ".join(f"{name}: {n} written" for name, n in summary.adapters.items())
    if summary.interrupted:
        typer.echo(f"interrupted ({summary.interrupted}): {line}\nThe results written so far are kept; rerun the "
                   "same command to do the rest.", err=True)
        # SystemExit, not typer.Exit: palikit.cli.main drops the code click returns for typer.Exit
        raise SystemExit(130 if summary.interrupted == "SIGINT" else 143)
    typer.echo(line)
    if summary.failed and not retry_failed:
        typer.echo("Fix the failed inputs and rerun with --retry-failed to run them again.", err=True)
