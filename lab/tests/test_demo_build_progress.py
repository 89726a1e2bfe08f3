"""Issue 20 item 10: `python -m lab.demo.build` shows progress (a rich bar per stage on stderr and
one line per finished stage) instead of running silently; stdout stays the JSON summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from lab.demo.paths import CHECKOUT

pytestmark = pytest.mark.slow  # a `lab.demo.build` subprocess


def test_demo_build_shows_progress(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FORCE_COLOR": "1", "COLUMNS": "150"}  # FORCE_COLOR: render the bar
    proc = subprocess.run([sys.executable, "-m", "lab.demo.build", "--out", str(tmp_path / "demo"), "--train", "4",
                           "--val", "2", "--test", "2", "--codec-images", "4", "--codec-steps", "3"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=CHECKOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["splits"] == {"train": 4, "validation": 2, "test": 2}
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stderr)  # drop colour / cursor codes
    frames = err.replace("\r", "\n")
    for n, what in ((1, "tokenizer"), (2, "mask crops for the codec"), (3, "mask codec training")):
        assert re.search(rf"^\[{n}/5\] {what}: .+ \(\d+\.\d s\)$", err, re.M), (what, err[-2000:])
    for split, n in (("train", 4), ("validation", 2), ("test", 2)):
        assert re.search(rf"^\[4/5\] data: {split} split, {n} images: {n} images, \d+ masks encoded", err, re.M)
    assert re.search(r"^\[5/5\] initial checkpoint: .+init \(", err, re.M)
    # the live bar itself: the codec stage counted its steps and the crops stage its images
    assert re.search(r"\[3/5\] mask codec training.* [123]/3 ", frames), frames[-2000:]
    assert re.search(r"\[2/5\] mask crops for the codec \(images\).* [0-4]/4 ", frames)
