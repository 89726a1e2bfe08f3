"""`palikit check DATA --model M` (or `palikit check recipe.yaml`): the pre-flight of a fine-tune
without running it (`train/preflight.py`): the data read and checked as `palikit train` reads it, the
base model's tokenizer and card, no weights loaded. One table, one verdict line; exit 1 on a failure
(data that cannot be read, rows too long), and with `--strict` on a warning too."""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer

from . import app


@app.command()
def check(
    target: Path = typer.Argument(..., help="Training data (.jsonl or COCO .json) or a recipe (.yaml)."),
    overrides: list[str] = typer.Argument(None, help="Recipe keys as key=value (max_steps=400 batch_size=16 ...)."),
    model: str = typer.Option(None, "--model", "-m", help="Base model folder (default: the recipe's, or the bundled "
                              "demo model)."),
    val: Path = typer.Option(None, "--val", help="Validation data (default: the recipe's val_data)."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 on a warning too (as preflight=strict does)."),
):
    """Pre-flight a fine-tune: vocabulary, what the model knows, epochs, validation, balance, boxes, lengths."""
    from rich.console import Console

    from ..train.config import TrainConfig

    console = Console()
    items = list(overrides or [])
    if target.suffix.lower() in (".yaml", ".yml"):
        cfg = TrainConfig.from_yaml(target, items)
    elif re.match(r"\w+=", str(target)) and not target.is_file():
        cfg = TrainConfig.from_dict({}, [str(target), *items], source="command line")
    else:
        cfg = TrainConfig.from_dict({"train_data": str(target)}, items, source="command line")
    if model:
        cfg.model = model
    if val:
        cfg.val_data = str(val)
    report = run_check(cfg, console.print)
    console.print(report.table())
    console.print(report.verdict(), style="bold red" if report.failures else "bold yellow" if report.warnings else
                  "bold green")
    if report.failures or (strict and report.warnings):
        raise SystemExit(1)


def run_check(cfg, log):
    """The pre-flight `Report` of `cfg` (data problems become failure rows, not exceptions)."""
    from ..assets import default_model
    from ..datafiles import DataError
    from ..weights.resolve import get_config
    from ..train.data import load_examples, select_tasks
    from ..train.loading import TRAIN_HINT, load_tokenizer, model_limits, text_limit
    from ..train.preflight import Report, preflight
    from ..train.prepare import check_lengths, split_validation

    if not cfg.train_data:
        raise ValueError("palikit check needs training data: palikit check DATA --model M (or a recipe with train_data)")
    cfg.model = default_model(cfg.model, log, hint=TRAIN_HINT)
    mc = get_config(cfg.model)
    data_kw = dict(data_format=cfg.data_format, strict=cfg.strict_data, coco_task=cfg.coco_task,
                   coco_images=cfg.coco_images, include_absent=cfg.coco_include_absent, mask_codec=cfg.mask_codec)
    failed = Report()
    try:
        train = list(load_examples(cfg.train_data, **data_kw).examples)
        val = list(load_examples(cfg.val_data, **data_kw).examples) if cfg.val_data else []
        if cfg.tasks:
            train = select_tasks(train, cfg.tasks, cfg.train_data)
            val = select_tasks(val, cfg.tasks, cfg.val_data) if val else val
        train, val = split_validation(cfg, train, val, log)
        tokenizer = load_tokenizer(cfg)
        max_len, why = (cfg.max_len, "max_len") if cfg.max_len else text_limit(cfg.model, mc.vision.num_image_tokens)
        train, lengths = check_lengths(cfg, tokenizer, train, max_len, cfg.train_data, log)
    except DataError as e:
        failed.add("data", str(e).replace("\n", " "), "fail")
        return failed
    n = len(train)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * (n // cfg.batch_size))) if n >= cfg.batch_size else 0
    source = "val_data" if cfg.val_data else f"val_fraction={cfg.val_fraction:g}"
    report = preflight(train, val, tokenizer, limits=model_limits(cfg.model), image_size=mc.vision.image_size,
                       patch=mc.vision.patch_size, batch_size=cfg.batch_size, steps=steps, lengths=lengths,
                       max_len=max_len, max_len_source=why, long_rows=cfg.long_rows, val_source=source)
    if n < cfg.batch_size:
        report.add("epochs", f"{n} training examples are fewer than batch_size={cfg.batch_size}", "fail")
    return report
