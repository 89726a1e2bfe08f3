"""Issue 20 item 1: SIGINT / SIGTERM during `palikit train` (save_every=0, the default) save a
resumable checkpoint at the next step boundary, print the exact resume command and exit 130 / 143;
a run that cannot write one says so. Real `palikit train` processes and real signals."""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers.train import run_config, write_dataset

pytestmark = pytest.mark.slow  # real `palikit train` processes and signals


def _setup(tmp_path):
    from palikit.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    write_dataset(tmp_path / "data")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(f"model: {tmp_path / 'base'}\ntrain_data: {tmp_path / 'data' / 'train.jsonl'}\n"
                   f"output_dir: {tmp_path / 'run'}\nbatch_size: 4\nmax_steps: 100000\nlog_every: 1\n"
                   "lr: 0.001\nwarmup: 0\nprogress: false\nplot: false\n")
    return cfg


class Run:
    """A `palikit train` process whose output is read line by line in a thread."""

    def __init__(self, args, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "palikit", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self._q.get(timeout=max(end - time.time(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if pattern in line:
                return line
        self.proc.kill()
        raise AssertionError(f"no line with {pattern!r} within {timeout}s; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc, "\n".join(self.lines)


def _step_of(checkpoint: str) -> int:
    return json.loads(open(os.path.join(checkpoint, "state.json")).read())["step"]


def test_sigint_then_sigterm_save_resumable_checkpoints_and_print_the_resume_command(tmp_path):
    cfg = _setup(tmp_path)
    run = Run(["train", str(cfg), "seed=0"], tmp_path)
    run.wait_for("step 3/100000")
    run.proc.send_signal(signal.SIGINT)
    rc, out = run.finish()
    assert rc == 130, out
    saved = [line for line in out.splitlines() if "interrupted by SIGINT at step" in line]
    assert len(saved) == 1 and "saved a resumable checkpoint" in saved[0], out
    ckpt = saved[0].split("saved a resumable checkpoint ", 1)[1]
    step = _step_of(ckpt)
    assert step >= 3 and f"at step {step}/100000" in saved[0]
    resume = [line for line in out.splitlines() if line.startswith("resume with: ")]
    assert resume == [f"resume with: palikit train {cfg} seed=0"], out

    args = shlex.split(resume[0].removeprefix("resume with: "))
    assert args[0] == "palikit"
    again = Run(args[1:], tmp_path)
    again.wait_for(f"resumed from {ckpt} (step {step}/100000)")
    again.wait_for(f"step {step + 2}/100000")
    again.proc.send_signal(signal.SIGTERM)
    rc, out = again.finish()
    assert rc == 143, out
    line = next(x for x in out.splitlines() if "interrupted by SIGTERM at step" in x)
    assert _step_of(line.split("saved a resumable checkpoint ", 1)[1]) >= step + 2


@pytest.mark.usefixtures("one_thread")
def test_interrupt_that_cannot_save_says_so(tmp_path, monkeypatch):
    """The checkpoint write fails (disk full): the message says nothing was written and what a rerun does."""
    from palikit.testing import make_tiny_checkpoint
    from palikit.train import TrainingInterrupted
    from palikit.train import checkpoint as ck
    from palikit.train.trainer import train

    make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    write_dataset(tmp_path / "data")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_checkpoint", full_disk)
    logs = []

    def log(msg):
        logs.append(msg)
        if msg.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal to this process, handled at the step boundary

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as e:
        train(run_config(tmp_path, max_steps=1000, plot=False), log=log)
    assert e.value.exit_code == 143 and e.value.checkpoint is None
    msg = str(e.value)
    assert "interrupted by SIGTERM at step 2/1000: could not write a checkpoint (OSError:" in msg, msg
    assert "no checkpoint exists" in msg and "starts from step 0" in msg
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back
