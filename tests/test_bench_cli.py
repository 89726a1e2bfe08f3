"""`palikit bench` on a shared machine (issue 37): --torch-threads, the load average before and after the
run in the JSON, a warning when the machine is busier than the threads used allow, and ratios in
words that say "slower" when palikit is slower (main printed "0.4x faster" for 2.5x slower)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from palikit.bench.inference import busy_cores, busy_warning, speed_words
from palikit.cli import main


@pytest.mark.parametrize("ratio, words", [
    (2.5, "2.5x faster than transformers"), (0.4, "2.5x slower than transformers"),
    (1.03, "about as fast as transformers"), (0.96, "about as fast as transformers"),
    (-131.3, "not measurable"), (float("nan"), "not measurable"),
])
def test_speed_ratios_in_words(ratio, words):
    assert speed_words(ratio, "transformers").startswith(words)


@pytest.mark.parametrize("load, now, cpus, threads, running, busy", [
    (2.5, None, 2, 2, False, True),   # others hold more than the 2 CPUs before the run
    (1.6, None, 2, 1, False, True),   # 0.4 CPU free for 1 thread
    (0.3, None, 2, 2, False, False),  # quiet
    (1.6, 0.1, 2, 2, False, False),   # the load average remembers a job that ended: the CPUs are free now
    (0.2, 1.9, 2, 1, False, True),    # a job that just started: busy now
    (3.1, None, 2, 2, True, True),    # during the run: more runnable threads than CPUs
    (2.2, None, 2, 2, True, False),   # the benchmark's own 2 threads
    (None, None, 2, 2, False, False),  # no load average on this OS
])
def test_busy_machine_warning(load, now, cpus, threads, running, busy):
    w = busy_warning(load, cpus, threads, busy=now, running=running)
    assert (w is not None) == busy
    if busy:
        assert f"load average {load:.1f}" in w and f"{cpus} CPUs" in w and f"{threads} torch thread" in w


def test_busy_cores_measures_a_busy_cpu():
    import threading
    import time

    stop = time.monotonic() + 1.0
    spin = threading.Thread(target=lambda: [None for _ in iter(lambda: time.monotonic() < stop, False)])
    spin.start()
    busy = busy_cores(0.5)
    spin.join()
    assert busy is not None and 0.5 <= busy <= os.cpu_count()  # at least the spinning thread's CPU


def test_bench_cli_threads_load_and_warning_in_the_json(monkeypatch, capsys):
    import palikit.bench.inference as inference

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 6.0, 5.25))
    monkeypatch.setattr(inference, "busy_cores", lambda interval=0.5: 1.8)
    try:
        code = main(["bench", "--batch-sizes", "1", "--new-tokens", "3", "--repeats", "1", "--no-transformers",
                     "--device", "cpu", "--torch-threads", "1"])
    finally:
        torch.set_num_threads(before)
    out, err = capsys.readouterr()
    err = " ".join(err.split())  # rich wraps lines at the console width
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["torch_threads"] == 1  # main: no --torch-threads
    assert report["load_average"] == {"start": [7.5, 6.0, 5.25], "end": [7.5, 6.0, 5.25]}
    assert report["cpu_count"] == os.cpu_count()
    assert report["cpus_busy_before"] == 1.8
    assert report["warnings"] and "the machine is busy: 1.8 of" in report["warnings"][0]
    assert "(1-minute load average 7.5)" in report["warnings"][0] and "--torch-threads 1" in report["warnings"][0]
    assert "warning:" in err and "load average [7.5, 6.0, 5.25] before" in err


def test_bench_cli_says_slower_when_palikit_is_slower(monkeypatch, capsys):
    import palikit.bench.inference as inference

    canned = {"model": "tiny-pg1", "device": "cpu", "dtype": "float32", "torch_threads": 2, "cpu_count": 2,
              "load_average": {"start": [0.1, 0.1, 0.1], "end": [1.9, 0.5, 0.2]}, "warnings": [],
              "cpus_busy_before": 0.1,
              "rows": [], "speedup_vs_transformers": {"1": {"decode_step_speedup": 0.4, "prefill_speedup": 0.5,
                                                            "images_per_s_ratio": 0.4}},
              "compile_speedup": {"1": 0.8}}
    monkeypatch.setattr(inference, "run_bench", lambda *a, **k: canned)
    assert main(["bench", "--device", "cpu"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps lines at the console width
    assert "decode step is 2.5x slower than transformers" in err and "images/s 2.5x slower" in err
    assert "the compiled step is 1.2x slower than the eager one" in err
    assert "faster" not in err  # main: "decode step 0.4x faster"
