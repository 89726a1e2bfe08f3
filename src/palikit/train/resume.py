"""Which checkpoint a run continues from, and whether it may.

`resume=true` picks the newest checkpoint in `output_dir/checkpoints` that passes verification
(`checkpoint.verify_checkpoint`: files present, checksums, readable headers; NaN / inf parameters are
found when it loads): every newer one is skipped with its reason in the log. Then the recipe it was written with
(`train_config.json` in the checkpoint; older runs: the one in output_dir) is compared with this run's:
- keys that only change how the run is watched or stored (`FREE`: logging, evaluation and save
  cadence, the time budget, progress, data workers...) may change;
- a changed mode, LoRA shape or frozen part (`STRUCTURAL`) cannot continue at all: the checkpoint holds
  other parameters ("use another output_dir or resume=false");
- any other changed key (lr, batch size, steps, data...) is refused with the list of changes unless
  `resume=force`, which continues from the checkpoint's step and optimizer state with the new values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from . import checkpoint as ck

FREE = frozenset({
    "log_every", "eval_every", "save_every", "keep_last", "keep_best", "max_minutes", "progress", "plot", "resume",
    "device", "data_workers", "cache_images", "export_dtype", "task_metric", "task_metric_samples", "collapse_warn",
    "plateau_patience", "early_stopping_patience", "preflight", "strict_data", "output_dir", "metric",
    "max_nonfinite_steps",
})
STRUCTURAL = ("mode", "lora_targets", "lora_rank", "freeze_vision", "freeze_decoder")


class RecipeChanged(ValueError):
    """The run in output_dir was made by another recipe (the message lists the changed keys)."""


def changed_keys(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for every recipe key whose value differs, except `FREE` ones."""
    return {k: (old.get(k), v) for k, v in new.items() if k not in FREE and k in old and old[k] != v}


def check_recipe(old: dict | None, new: dict, where: Path, resume) -> list[str]:
    """Refuse (`RecipeChanged`) a checkpoint of another recipe; returns the changes `resume=force` let
    through, as text for the log."""
    if old is None:
        return []
    changes = changed_keys(old, new)
    shown = [f"{k} ({_show(a)} -> {_show(b)})" for k, (a, b) in changes.items()]
    structural = [k for k in STRUCTURAL if k in changes]
    if structural:
        raise RecipeChanged(
            f"{where} was trained with another {' / '.join(structural)}: changed {', '.join(shown)}. Its checkpoints "
            "hold other parameters, so the run cannot continue from them: use another output_dir or resume=false "
            "(starts over and replaces those checkpoints).")
    if changes and resume != "force":
        raise RecipeChanged(
            f"{where} holds a run of another recipe: changed {', '.join(shown)}. Resuming would mix the two. "
            "Use another output_dir, resume=false to start over, or resume=force to continue from its step and "
            "optimizer state with the new values.")
    return shown


def _show(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def resume_from(output_dir: Path, config: dict, resume, load: Callable[[Path], dict],
                log: Callable[[str], None]) -> tuple[Path, dict] | None:
    """Load (`load(path)` -> its state.json) the newest checkpoint that verifies, loads and was written
    by this recipe (`check_recipe`); None when output_dir has no checkpoint. Each newer checkpoint that
    fails is logged with its reason (`load` raising `CheckpointError`: e.g. NaN / inf parameters);
    when every one fails it is an error, not a silent restart from step 0."""
    folders = ck.step_folders(output_dir)
    skipped = 0
    for path in reversed(folders):
        try:
            ck.verify_checkpoint(path)
            old = ck.saved_config(path)
            if old is None and (output_dir / ck.CONFIG).is_file():  # written before checkpoints kept their recipe
                old = json.loads((output_dir / ck.CONFIG).read_text())
            for change in check_recipe(old, config, output_dir, resume):
                log(f"resume=force: continuing with {change}")
            state = load(path)
        except ck.CheckpointError as e:
            log(f"resume: skipped {path} ({e})")
            skipped += 1
            continue
        if skipped:
            log(f"resume: continuing from {path.name}, the newest intact checkpoint ({skipped} newer one(s) skipped)")
        return path, state
    if skipped:
        raise ck.CheckpointError(f"no intact checkpoint in {output_dir / ck.CKPT_DIR} (each one is listed above with "
                                 "what is wrong): resume=false starts over, or use another output_dir")
    return None
