"""`palikit train CONFIG.yaml [key=value ...]`: fine-tuning (works under torchrun for DDP).

The recipe keys in `--help` and `--keys` are generated from `TrainConfig` (defaults and the comment
on each field), never a second hand-written list. Ctrl-C / SIGTERM save a resumable checkpoint at the
next step boundary, print the resume command and exit 130 / 143; a run whose loss stays NaN / inf
stops with exit 3 (`train/guard.py`); the pre-flight table (`palikit check`) prints first.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import typer

from . import app


def _epilog() -> str:
    from rich.markup import escape

    from ..train.config import recipe_keys_text

    # escape keeps the regex defaults' brackets out of rich markup
    return escape("Recipe keys (YAML `key: value` or `key=value` overrides), with defaults:\n\n"
                  + recipe_keys_text())


@app.command(context_settings={"allow_extra_args": False}, epilog=_epilog())
def train(
    config: Path = typer.Argument(None, help="YAML training config (keys: see below or --keys)."),
    overrides: list[str] = typer.Argument(None, help="Key overrides, e.g. lr=1e-4 mode=lora batch_size=8."),
    keys: bool = typer.Option(False, "--keys", help="List every recipe key with its default and meaning, then exit."),
):
    """Fine-tune (full, attention-only, LoRA, frozen towers); resumable; writes output_dir/final.
    No `model:` (or model=demo) trains the bundled demo model."""
    if keys:
        from ..train.config import recipe_keys_text

        typer.echo(recipe_keys_text())
        return
    if config is None:
        raise ValueError("palikit train needs a YAML config or key=value overrides: palikit train [CONFIG.yaml] "
                         "key=value ... (palikit train --keys lists every key)")
    from ..train import TrainConfig, TrainingInterrupted
    from ..train import train as run_train
    from ..train.guard import TrainingDiverged

    command = ["palikit", "train", str(config), *(overrides or [])]
    if re.match(r"\w+=", str(config)) and not config.is_file():  # no YAML: every argument is a key=value override
        config = TrainConfig.from_dict({}, command[2:], source="command line")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: resume the same way
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        command = ["torchrun", f"--nproc_per_node={nproc}", "-m", *command]
    try:
        final = run_train(config, list(overrides or []), command=command)
    except (TrainingInterrupted, TrainingDiverged) as e:  # the message (what was saved, what next) is printed
        # SystemExit, not typer.Exit: cli.main() drops the code click returns for Exit in standalone_mode=False
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside the step loop (loading the model / data, or the final export)
        typer.echo("interrupted outside the training steps (loading or exporting): nothing new saved; "
                   f"checkpoints already in output_dir are kept; rerun to resume: {shlex.join(command)}", err=True)
        raise SystemExit(130) from None
    typer.echo(f"final checkpoint: {final}")
