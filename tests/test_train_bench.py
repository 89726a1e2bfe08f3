"""The training-throughput benchmark runs both engines on the same LoRA config and reports: run as
its command, its last stdout line is one JSON document with both engines, positive figures that agree
with each other and with the printed table, and the trainable-parameter count a LoRA of that rank on
the model's attention projections has."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two benchmark subprocesses

ARGS = {"model": "tiny-pg1", "device": "cpu", "dtype": "float32", "batch_size": 2, "prefix_len": 4, "suffix_len": 4,
        "rank": 4, "steps": 2, "threads": 1}


def _lora_params(model_name: str, rank: int) -> int:
    """rank x (in + out) for every Linear the benchmark's LoRA targets (q/k/v/o_proj, both towers)."""
    from torch import nn

    from palikit.weights.resolve import get_config
    from palikit.model import build_model
    from palikit.bench.train import TARGETS

    model = build_model(get_config(model_name), "meta")
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def test_train_bench_compares_palikit_with_transformers_peft():
    cmd = [sys.executable, "-m", "palikit", "bench-train"] + [
        a for k, v in ARGS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.rstrip("\n").splitlines()
    report = json.loads(lines[-1])
    assert {k: report[k] for k in ARGS} == ARGS  # the run it reports is the one asked for
    ours, theirs = report["rows"]
    assert (ours["engine"], theirs["engine"]) == ("palikit", "transformers+peft")
    expected = _lora_params(ARGS["model"], ARGS["rank"])
    assert ours["trainable_params"] == theirs["trainable_params"] == expected > 0  # the same LoRA on both sides
    for row in (ours, theirs):
        assert row["samples_per_s"] > 0 and row["step_ms"] > 0 and row["peak_gib"] > 0
        assert row["peak_kind"] == "process peak RSS"
        # samples/s and ms/step are two views of the same timing
        assert math.isclose(row["samples_per_s"] * row["step_ms"] / 1e3, ARGS["batch_size"], rel_tol=1e-9)
    assert math.isclose(report["speedup"], ours["samples_per_s"] / theirs["samples_per_s"], rel_tol=1e-12)
    assert math.isclose(report["memory_ratio"], ours["peak_gib"] / theirs["peak_gib"], rel_tol=1e-12)
    table = "\n".join(lines[:-1])
    assert f"{report['speedup']:.2f}x samples/s, {report['memory_ratio']:.2f}x memory" in table
    for row in (ours, theirs):
        assert f"{row['engine']:>18}: {row['samples_per_s']:8.1f} samples/s" in table
