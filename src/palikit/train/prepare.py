"""The run's examples, made ready before the first step: a validation split held out of train_data
(`val_fraction`, by image) and the length check (`max_len`: rows longer than the model takes are refused
with their file and line, or cut with `long_rows=truncate`). One tokenizer pass over the file data;
the lengths it measures feed the pre-flight's table too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..datafiles import MAX_LISTED, DataError, Problem
from .collate import long_rows
from .config import TrainConfig
from .data import Example, holdout


def example_problem(ex: Example, message: str) -> Problem:
    """A `Problem` at the example's origin (`file:12` -> line 12, `file:image_id=7`)."""
    file, _, where = ex.source.rpartition(":")
    if not file:
        return Problem(ex.source or "training data", "-", message)
    return Problem(file, f"line {where}" if where.isdigit() else where, message)


def split_validation(cfg: TrainConfig, train: list[Example], val: list[Example], log: Callable[[str], None]
                     ) -> tuple[list[Example], list[Example]]:
    """`val_fraction` of train_data's images held out as the validation split (when there is none)."""
    if val or not cfg.val_fraction:
        return train, val
    train, val, k, n = holdout(train, cfg.val_fraction, cfg.seed)
    log(f"val_fraction={cfg.val_fraction:g}: {k} of {n} images ({len(val)} examples) held out as the validation "
        "split (seeded; no image in both)")
    return train, val


def check_lengths(cfg: TrainConfig, tokenizer, examples: Sequence[Example], max_len: int, what: str,
                  log: Callable[[str], None]) -> tuple[list[Example], list[int]]:
    """(the examples kept, their text lengths). Rows over `max_len`: with long_rows=truncate kept (the
    collator cuts them); else a `DataError` naming each (strict_data) or skipped and reported."""
    lengths, messages = long_rows(tokenizer, examples, max_len)
    if not messages:
        return list(examples), lengths
    if cfg.long_rows == "truncate":
        log(f"{len(messages)} example(s) of {what} are longer than max_len={max_len} text tokens: their tails are cut "
            "(long_rows=truncate)")
        return list(examples), lengths
    problems = [example_problem(ex, f"{n} text tokens, more than max_len={max_len}")
                for ex, n in zip(examples, lengths) if n > max_len]
    if cfg.strict_data:
        raise DataError(problems, what, hint=f"raise max_len, set long_rows=truncate to cut them, or strict_data=false "
                                            "to skip them")
    keep = [(ex, n) for ex, n in zip(examples, lengths) if n <= max_len]
    listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
    log(f"skipped {len(problems)} example(s) of {what} longer than max_len={max_len} (strict_data=false):\n{listed}")
    return [ex for ex, _ in keep], [n for _, n in keep]
