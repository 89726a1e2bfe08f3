"""The training-throughput benchmark runs both engines on the same LoRA config and reports."""

from __future__ import annotations

from palikit.train.bench import run


def test_train_bench_compares_palikit_with_transformers_peft():
    report = run({"model": "tiny-pg1", "device": "cpu", "dtype": "float32", "batch_size": 2, "prefix_len": 4,
                  "suffix_len": 4, "rank": 4, "steps": 2, "threads": 1})
    ours, theirs = report["rows"]
    assert (ours["engine"], theirs["engine"]) == ("palikit", "transformers+peft")
    assert ours["trainable_params"] == theirs["trainable_params"] > 0  # the same LoRA config on both sides
    assert ours["samples_per_s"] > 0 and theirs["samples_per_s"] > 0 and report["speedup"] > 0
