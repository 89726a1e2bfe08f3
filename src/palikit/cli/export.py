"""`palikit export CHECKPOINT --out DIR`: a trainer checkpoint (`output_dir/checkpoints/step-N`, which
holds only the trained parameters) or a run folder (its best checkpoint, else the newest) as a loadable
model folder in the Hugging Face Hub layout (`--format hub`, the default): the base model with the
checkpoint's weights (LoRA merged), its tokenizer, preprocessor and codec files
(`train.export.export_checkpoint`). The folder is written atomically; an existing DIR is refused without
`--overwrite`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app

FORMATS = ("hub",)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A trainer checkpoint (runs/x/checkpoints/step-N) or a run folder "
                                      "(runs/x: its best checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (refused if it exists, unless --overwrite)."),
    fmt: str = typer.Option("hub", "--format", help="hub: the Hugging Face Hub layout (safetensors + config.json)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the training dtype)."),
    base_model: str = typer.Option(None, "--base-model", help="The base model folder, when the one the run "
                                   "trained from has moved."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
):
    """Turn a trainer checkpoint into a model folder palikit, transformers and vLLM load."""
    from ..train.export import export_checkpoint, trainer_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    step = trainer_checkpoint(checkpoint)
    if step is None:
        raise FileNotFoundError(f"{checkpoint} is not a trainer checkpoint (output_dir/checkpoints/step-N with "
                                "trainable.safetensors and state.json) nor a run folder holding checkpoints/; a model "
                                "folder (config.json + safetensors) is already loadable as it is")
    done = export_checkpoint(step, out, model=base_model, dtype=dtype, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {done} (Hub layout, from {step}): palikit predict IMG --model {done}")
