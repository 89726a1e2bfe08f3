"""How a training run stops, as methods of `Trainer`: at a signal (`interrupt.py`: a resumable
checkpoint, the resume command, exit 130 / 143), at the `max_minutes` budget, by early stopping
(`early_stopping_patience`), on a loss that stays non-finite (`guard.py`: nothing saved from that
state, exit 3) and on any other error in the loop (a checkpoint of the steps made so far first)."""

from __future__ import annotations

import signal
import time

import torch

from . import checkpoint as ck
from .guard import TrainingDiverged
from .interrupt import StopSignals, TrainingInterrupted, interrupted_message, resume_command
from .monitor import early_stop_due


class Stopping:
    """Mixed into `Trainer` (it has cfg, step, total_steps, best, history, out, dist, guard, save, log)."""

    def _early_stop(self) -> bool:
        """`early_stopping_patience` evaluations without a better `best_metric`: end here as at a last step."""
        n = self.cfg.early_stopping_patience
        if not n or self.best is None or not early_stop_due(self.history, self.best, self.step, n):
            return False
        self.log(f"early stopping at step {self.step}/{self.total_steps}: {self.best['metric']} has not improved for "
                 f"{n} evaluations (best {self.best['value']:.5g} at step {self.best['step']}; "
                 "early_stopping_patience=0 turns this off)")
        if self._saved_step != self.step and (path := self.save()) is not None:
            self.log(f"saved {path}")
        return True

    def _diverged(self) -> None:
        """Stop: the loss / gradient stayed non-finite (`guard.py`). Nothing is saved from this state, and
        the checkpoints whose weights gave a non-finite loss (step >= the streak's first step - 1) are moved
        aside to `checkpoints/diverged-step-N` so that no resume starts from them."""
        bad_from = self.guard.run[0]["step"] - 1
        moved = []
        if self.is_main:
            for p in ck.step_folders(self.out):
                if int(p.name[len(ck.PREFIX):]) >= bad_from:
                    p.rename(p.parent / f"diverged-{p.name}")
                    moved.append(p.name)
        last = ck.latest_checkpoint(self.out)
        bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")
        msg = self.guard.message(self.total_steps, self.cfg, last, bf16, moved)
        self.log(msg)
        raise TrainingDiverged(msg, last)

    def _save_before_dying(self) -> None:
        """An error in the loop (a bad example with strict_data, a full disk...): keep the steps made so far
        in a checkpoint when one can be written (a single process; not after a non-finite state)."""
        if self.dist.world > 1 or self.step == 0 or self._saved_step == self.step or self.guard.run:
            return
        try:
            path = self.save()
        except Exception as e:  # noqa: BLE001 - the original error is the one raised
            self.log(f"could not save a checkpoint before stopping ({type(e).__name__}: {e})")
            return
        self.log(f"error at step {self.step + 1}: saved {path} first; fix the problem and run the same command to "
                 "resume from it")

    def _out_of_time(self, t0: float) -> bool:
        """Is the `max_minutes` budget spent (on any rank: all ranks stop at the same step)?"""
        if self.cfg.max_minutes is None:
            return False
        over = time.time() - t0 >= self.cfg.max_minutes * 60
        if self.dist.world > 1:
            over = bool(self.dist.all_sum(torch.tensor([float(over)], device=self.device)).item())
        return over

    def _should_stop(self, stop: StopSignals) -> bool:
        """At a step boundary: did a signal arrive (on any rank: all ranks stop at the same step)?"""
        if self.dist.world > 1:
            flag = torch.tensor([float(stop.signum or 0)], device=self.device)
            got = int(self.dist.all_sum(flag).item())
            if got and stop.signum is None:
                stop.signum = signal.SIGTERM if got % int(signal.SIGINT) else signal.SIGINT
        return stop.signum is not None

    def _interrupted(self, signum: int, hard: bool) -> None:
        """Save a resumable checkpoint (unless one exists for this step or `hard`), say what was saved
        and how to resume, raise TrainingInterrupted (exit status 128 + signum in `palikit train`)."""
        saved, error = None, None
        if not hard and self.step > 0:
            try:
                saved = ck.latest_checkpoint(self.out) if self._saved_step == self.step else self.save()
            except Exception as e:  # noqa: BLE001 - reported to the user with what survives
                error = e
        last = None if saved is not None else ck.latest_checkpoint(self.out)
        msg = interrupted_message(signum, self.step, self.total_steps, saved, error, last,
                                  resume_command(self.command, self.cfg.resume), self.out, hard=hard)
        self.log(msg)
        raise TrainingInterrupted(signum, msg, saved)
