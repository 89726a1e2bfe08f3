"""`palikit batch` checks its inputs and its output folder before Ray starts or a model loads
(issue 38 B1 and its "risks" line): every bad JSONL row listed with its line, an unwritable output
refused at once (main found it after ~22 s of Ray start-up and inference)."""

from __future__ import annotations

import json
import sys
import time

import pytest
from PIL import Image

from palikit.cli import main
from palikit.datafiles import DataError
from palikit.distributed.ray_batch import read_inputs, run_batch


def _rows(tmp_path, rows):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    p = tmp_path / "in.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_bad_rows_are_refused_before_ray_starts(tmp_path):
    """issue 38 B1: a row whose `image` is not a string crashed the job with a Ray traceback after the
    model ran, and nothing was written; now every bad row is listed up front."""
    p = _rows(tmp_path, [{"image": "a.png"}, {"image": 5}, {"image": "a.png", "labels": {"a": 1}},
                         {"image": "a.png", "prompt": ["x"]}, "[" * 50_000 + "]" * 50_000, {"id": "x"}])
    with pytest.raises(DataError) as e:
        read_inputs(p)
    text = str(e.value)
    for n, what in [(2, "'image' must be a path string, got int"), (3, "'labels' must be a string"),
                    (4, "'prompt' must be a string"), (5, "JSON nested too deeply"), (6, "missing the 'image' field")]:
        assert f"in.jsonl:line {n}: {what}" in text, text
    assert "line 1" not in text
    t0 = time.perf_counter()
    with pytest.raises(DataError):
        run_batch(p, tmp_path / "out", "ocr", "demo", device="cpu")
    assert time.perf_counter() - t0 < 10
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_unwritable_output_is_refused_first(tmp_path, capsys):
    """issue 38 risk: an unwritable output folder was found only after Ray start-up and inference."""
    p = _rows(tmp_path, [{"image": "a.png"}])
    (tmp_path / "file").write_text("not a folder")
    t0 = time.perf_counter()
    rc = main(["batch", "--input", str(p), "--output", str(tmp_path / "file" / "out"), "--task", "ocr",
               "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "cannot write results to --output" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
