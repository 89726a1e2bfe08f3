"""A training run SIGKILLed mid-way resumes from its latest complete checkpoint and ends with the
same weights as an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import pytest
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from palikit.train.trainer import train
from helpers.train import run_config, run_kwargs, setup_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: training subprocesses, one SIGKILLed

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


RUNNER = """
import sys, time
sys.path[:0] = [{tests!r}, {src!r}]
import torch
torch.set_num_threads(1)
from palikit.train.config import TrainConfig
from palikit.train import trainer as T
from helpers.train import SimpleImageProcessor, WordTokenizer
slow = float(sys.argv[2])
step = T.Trainer.train_step
def slow_step(self, s, batches=None):
    out = step(self, s, batches)
    time.sleep(slow)
    return out
T.Trainer.train_step = slow_step
cfg = TrainConfig.from_yaml(sys.argv[1], sys.argv[3:])
print("FINAL", T.train(cfg, tokenizer=WordTokenizer(), image_processor=SimpleImageProcessor(28),
                       log=lambda m: print(m, flush=True)), flush=True)
"""


def _runner(tmp_path, cfg, slow=0.0, *over):
    (tmp_path / "run.py").write_text(RUNNER.format(tests=str(TESTS), src=str(SRC)))
    (tmp_path / f"{Path(cfg.output_dir).name}.yaml").write_text(cfg.to_yaml())
    return [sys.executable, str(tmp_path / "run.py"), str(tmp_path / f"{Path(cfg.output_dir).name}.yaml"), str(slow), *over]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    setup_run(tmp_path)
    steps = dict(max_steps=10, save_every=2, keep_last=2, plot=False)
    # the uninterrupted reference runs here (1 thread, like the subprocesses)
    train(run_config(tmp_path, "ref", **steps), **run_kwargs())

    cmd = _runner(tmp_path, run_config(tmp_path, "killed", **steps), 0.2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 90
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if "step-00000004" in line:  # checkpoint 4 published: kill while step 5/6 run
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    out = tmp_path / "killed"
    assert not (out / "final").exists()
    # a half-written checkpoint (what a kill during a save leaves) is ignored and cleaned up
    (out / "checkpoints" / ".tmp-step-00000099-1").mkdir()
    (out / "checkpoints" / ".tmp-step-00000099-1" / "trainable.safetensors").write_bytes(b"garbage")

    res = subprocess.run(cmd[:3] + ["0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    resumed = [ln for ln in res.stdout.splitlines() if ln.startswith("resumed from")]
    assert resumed and "step-0000000" in resumed[0], res.stdout
    start = int(resumed[0].split("step ")[1].split("/")[0])
    assert 4 <= start < 10
    assert f"step {start + 1}/10" in res.stdout and "step 1/10" not in res.stdout
    assert not (out / "checkpoints" / ".tmp-step-00000099-1").exists()

    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |resumed - uninterrupted| = {diff:.3g}")
    assert diff <= 1e-6, diff
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3  # it did train
