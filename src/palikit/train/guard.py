"""A run that diverges stops instead of training on NaN: every step's loss and gradient norm are
checked; a non-finite one skips that step's update (the weights stay as they were, the LR schedule
moves on, as a mixed-precision loss scaler does) and `max_nonfinite_steps` of them in a row stop the
run with `TrainingDiverged`: nothing is saved or exported from the broken state, nor saved during a
streak; checkpoints whose weights gave the non-finite loss are moved aside (`diverged-step-N`), the
others (all finite: `checkpoint.save_checkpoint` refuses NaN / inf) stay, and the message names the
steps, the last good checkpoint and what to try. A run that ends inside a streak stops the same way.
`palikit train` exits 3.
"""

from __future__ import annotations

import math
from pathlib import Path

EXIT_CODE = 3


class TrainingDiverged(Exception):
    """The loss or gradient stayed non-finite for `max_nonfinite_steps` steps; str() is the user's
    message, `checkpoint` the last finite checkpoint (None: none was written)."""

    exit_code = EXIT_CODE

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteGuard:
    """Counts consecutive steps with a NaN / inf loss or gradient norm."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[dict] = []  # the current streak's step records

    @staticmethod
    def finite(rec: dict) -> bool:
        return math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])

    def note(self, rec: dict) -> str | None:
        """Record a step; a warning line for a skipped one (None for a finite step)."""
        if self.finite(rec):
            self.run = []
            return None
        self.run.append(rec)
        return (f"step {rec['step']}: loss {rec['loss']:.4g}, grad_norm {rec['grad_norm']:.4g}: not finite, update "
                f"skipped ({len(self.run)} of {self.limit} in a row allowed)")

    @property
    def tripped(self) -> bool:
        return len(self.run) >= self.limit

    def message(self, total: int, cfg, last: Path | None, bf16: bool = False, moved: list[str] = ()) -> str:
        first, end = self.run[0]["step"], self.run[-1]["step"]
        steps = f"step {first}" if first == end else f"steps {first}-{end}"
        aside = (f"; {', '.join(moved)} (whose weights gave that loss) moved to checkpoints/diverged-*" if moved else "")
        keep = (f"the last good checkpoint is {last} (to continue from it with a changed recipe: the same command with "
                "resume=force)" if last is not None else
                "no checkpoint from before it diverged exists (start again from the base model)") + aside
        tips = [f"a lower lr (now {cfg.lr:g})"]
        if not cfg.grad_clip:
            tips.append("grad_clip=1.0 (now off)")
        if bf16:
            tips.append(f"precision=fp32 (now bf16 autocast, precision={cfg.precision})")
        tips.append(f"a longer warmup (now {cfg.warmup:g})")
        tips.append("a look at the examples of those steps (an empty or extreme target)")
        return (f"training stopped at step {end}/{total}: the loss or gradient was NaN / inf for {len(self.run)} steps "
                f"in a row ({steps}; their updates were skipped). Nothing was saved or exported from this state; "
                f"{keep}. Try {', '.join(tips)}.")
