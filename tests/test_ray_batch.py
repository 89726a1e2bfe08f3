"""Ray Data batch inference on a local CPU Ray: equal to `pg.predict`, resumable after a kill,
corrupt inputs recorded, 1 vs 2 workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ray

from palikit.api import PaliGemma
from palikit.distributed.ray_batch import done_ids, read_results, run_batch
from palikit.testing import make_tiny_checkpoint

pytestmark = pytest.mark.slow  # a real Ray cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ray-tiny"), family="pg1")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _images(folder: Path, n: int, corrupt: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    for i in range(corrupt):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_results_equal_predict_one_by_one_and_corrupt_inputs_recorded(ckpt, ray_local, tmp_path):
    src = _images(tmp_path / "in", 6, corrupt=2)
    summary = run_batch(src, tmp_path / "out", "caption", str(ckpt), batch_size=4, num_workers=1, device="cpu",
                        max_new_tokens=6, progress=False)
    assert (summary.total, summary.written, summary.failed) == (8, 8, 2)
    rows = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert len(rows) == 8
    pg = PaliGemma.from_pretrained(ckpt, device="cpu")
    for i in range(6):
        expected = pg.predict(src / f"img{i:03d}.png", "caption en", max_new_tokens=6)
        assert rows[f"img{i:03d}.png"]["text"] == expected.text
        assert rows[f"img{i:03d}.png"]["error"] == ""
    for i in range(2):
        assert "ImageError" in rows[f"bad{i}.png"]["error"]
    again = run_batch(src, tmp_path / "out", "caption", str(ckpt), device="cpu", progress=False)
    assert (again.skipped, again.written) == (8, 0)


def test_parquet_output_and_jsonl_input_with_per_row_questions(ckpt, ray_local, tmp_path):
    src = _images(tmp_path / "imgs", 3)
    lines = [json.dumps({"id": f"q{i}", "image": f"imgs/img{i:03d}.png", "question": f"what is {i}"}) for i in range(3)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines))
    run_batch(tmp_path / "in.jsonl", tmp_path / "out", "answer", str(ckpt), fmt="parquet", device="cpu",
              max_new_tokens=4, progress=False)
    rows = read_results(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"]
    assert {r["prompt"] for r in rows} == {f"answer en what is {i}" for i in range(3)}
    del src


def test_killed_job_resumes_and_writes_every_input_exactly_once(ckpt, tmp_path):
    src = _images(tmp_path / "in", 24)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "palikit.cli", "batch", "--input", str(src), "--output", str(out), "--task", "ocr",
           "--model", str(ckpt), "--batch-size", "2", "--device", "cpu", "--max-new-tokens", "24"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(done_ids(out)) < 4:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray workers, mid-way
    proc.wait()
    first = done_ids(out)
    assert 0 < len(first) < 24, "the kill should land mid-job"
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    ids = []
    for part in out.glob("part-*.jsonl"):
        ids += [json.loads(line)["id"] for line in part.read_text().splitlines()]
    assert sorted(set(ids)) == sorted(f"img{i:03d}.png" for i in range(24))
    assert len(ids) == 24, "no input written twice"


def test_bad_arguments_are_clear(ckpt, tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        run_batch(tmp_path, tmp_path / "o", "translate", str(ckpt))
    with pytest.raises(ValueError, match="needs labels"):
        _images(tmp_path / "in", 1)
        run_batch(tmp_path / "in", tmp_path / "o", "detect", str(ckpt), device="cpu")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        run_batch(tmp_path / "bad.jsonl", tmp_path / "o", "ocr", str(ckpt))
