"""Stopping a training run cleanly on SIGINT (Ctrl-C) / SIGTERM (kill, schedulers, torchrun).

`StopSignals` replaces the two handlers while the loop runs: the first signal is only noted (the loop
finishes the step it is in, writes a resumable checkpoint and raises `TrainingInterrupted`); a second
Ctrl-C stops at once without saving. `palikit train` turns `TrainingInterrupted` into exit status
128 + signal (130 for SIGINT, 143 for SIGTERM) after printing what was saved and the resume command.
A `max_minutes` budget is the other clean stop: the run ends as at its last step (`time_budget_message`).
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped by a signal. `exit_code` = 128 + signal number; `checkpoint` is the folder a
    resumed run continues from (None when nothing could be written); str() is the user's message."""

    def __init__(self, signum: int, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager noting SIGINT / SIGTERM in `.signum` instead of dying mid-step (main thread only;
    elsewhere it does nothing, and the process keeps Python's default handling)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # second Ctrl-C: stop now, no checkpoint
            return
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to the same stream
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after the current step and saving a "
                    "checkpoint (Ctrl-C again stops at once without saving)\n".encode())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def resume_command(command: list[str] | None, resume_flag: bool) -> str | None:
    """The command that continues the run: the launching command with `resume=true` (a `resume=false`
    override is dropped; a config whose resume is false gets `resume=true` added)."""
    if not command:
        return None
    args = [a for a in command if not a.startswith("resume=")]
    if not resume_flag or any(a.startswith("resume=") for a in command):
        args.append("resume=true")
    return shlex.join(args)


def time_budget_message(minutes: float, elapsed_s: float, step: int, total: int, evaluated: bool,
                        resume: str | None) -> str:
    """What the user reads when `max_minutes` ended the run (`resume`: the command that continues it)."""
    how = f"run `{resume}`" if resume else "train again with the same output_dir and resume=true"
    return (f"time budget (max_minutes={minutes:g}) spent after {elapsed_s:.0f}s: stopped at step {step}/{total}, "
            f"{'evaluated, ' if evaluated else ''}saved and exported as a last step; {total - step} steps left (the LR "
            f"schedule still spans {total}); to continue, {how}")


def interrupted_message(signum: int, step: int, total: int, saved: Path | None, error: BaseException | None,
                        last: Path | None, resume: str | None, output_dir: Path, hard: bool = False) -> str:
    """What the user reads after an interrupt: what was saved (or why nothing was), how to resume."""
    head = f"interrupted by {signal_name(signum)} at step {step}/{total}"
    if saved is not None:
        lines = [f"{head}: saved a resumable checkpoint {saved}"]
    else:
        why = f"could not write a checkpoint ({type(error).__name__}: {error})" if error else "no checkpoint written"
        if hard:
            why = "stopped at once by a second Ctrl-C, without saving"
        elif step == 0:
            why = "before the first step finished: nothing to save"
        lost = (f"the run resumes from {last} (step {int(last.name.split('-')[-1])})" if last is not None
                else f"no checkpoint exists in {output_dir}: a rerun starts from step 0")
        lines = [f"{head}: {why}; {lost}"]
    if resume:
        lines.append(f"resume with: {resume}")
    else:
        lines.append(f"resume: run train() again with the same config (resume=true, output_dir={output_dir})")
    return "\n".join(lines)
