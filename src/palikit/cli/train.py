"""`palikit train CONFIG.yaml [key=value ...]`: fine-tuning (works under torchrun for DDP)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Path = typer.Argument(..., help="YAML training config (see palikit.train.TrainConfig)."),
    overrides: list[str] = typer.Argument(None, help="Field overrides, e.g. lr=1e-4 mode=lora batch_size=8."),
):
    """Fine-tune (full, attention-only, LoRA, frozen towers); resumable; writes output_dir/final."""
    from ..train import train as run_train

    final = run_train(config, list(overrides or []))
    typer.echo(f"final checkpoint: {final}")
