"""Ray Data batch inference on a local CPU Ray: equal to `pg.predict`, resumable after a kill,
corrupt inputs recorded, 1 vs 2 workers; resume keyed by input AND task/options, --retry-failed,
detections as structured columns, Ctrl-C keeps what was written and exits 130, the local Ray node
on 127.0.0.1."""

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
from palikit.distributed.ray_batch import detection_columns, done_ids, init_ray, read_results, run_batch
from palikit.testing import make_tiny_checkpoint

pytestmark = pytest.mark.slow  # a real Ray cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ray-tiny"), family="pg1")


@pytest.fixture(scope="module")
def ray_local():
    init_ray(num_cpus=2)
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
    again = run_batch(src, tmp_path / "out", "caption", str(ckpt), device="cpu", max_new_tokens=6, progress=False)
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


def _batch_command(ckpt, src, out) -> tuple[list[str], dict[str, str]]:
    """`palikit batch` OCR over `src` into `out` in its own process (and that process's environment)."""
    cmd = [sys.executable, "-m", "palikit.cli", "batch", "--input", str(src), "--output", str(out), "--task", "ocr",
           "--model", str(ckpt), "--batch-size", "2", "--device", "cpu", "--max-new-tokens", "24"]
    return cmd, {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def test_killed_job_resumes_and_writes_every_input_exactly_once(ckpt, tmp_path):
    src = _images(tmp_path / "in", 24)
    out = tmp_path / "out"
    cmd, env = _batch_command(ckpt, src, out)
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
    with pytest.raises(ValueError, match=r"bad.jsonl:line 2: invalid JSON"):
        run_batch(tmp_path / "bad.jsonl", tmp_path / "o", "ocr", str(ckpt))


def test_local_ray_listens_on_loopback_only(ray_local):
    import psutil

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    ours = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
    listening = {(ours[c.pid], c.laddr.ip) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours}
    assert any(name == "gcs_server" for name, _ in listening), listening
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


def test_another_task_into_the_same_folder_runs_and_results_are_kept_per_task(ckpt, ray_local, tmp_path):
    src = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    first = run_batch(src, out, "ocr", str(ckpt), device="cpu", max_new_tokens=4, progress=False)
    second = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=4, progress=False)
    assert (first.written, second.written, second.skipped) == (3, 3, 0)
    again = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=4, progress=False)
    assert (again.written, again.skipped) == (0, 3)
    longer = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=6, progress=False)
    assert longer.written == 3, "other options are another job"
    assert {r["prompt"] for r in read_results(out, task="ocr")} == {"ocr"}
    assert len(read_results(out, task="caption")) == 6 and len(read_results(out)) == 9
    assert {r["task"] for r in read_results(out)} == {"ocr", "caption"}


def test_retry_failed_reruns_fixed_inputs(ckpt, ray_local, tmp_path):
    src = _images(tmp_path / "in", 2, corrupt=1)
    out = tmp_path / "out"
    run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=4, progress=False)
    Image.fromarray(np.full((24, 30, 3), 120, dtype=np.uint8)).save(src / "bad0.png")  # fixed
    plain = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=4, progress=False)
    assert plain.written == 0
    retry = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=4, progress=False,
                      retry_failed=True)
    assert (retry.written, retry.failed, retry.skipped) == (1, 0, 2)
    rows = {r["id"]: r for r in read_results(out)}
    pg = PaliGemma.from_pretrained(ckpt, device="cpu")
    assert rows["bad0.png"]["error"] == ""
    assert rows["bad0.png"]["text"] == pg.predict(src / "bad0.png", "caption en", max_new_tokens=4).text


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_detections_are_structured_columns(ray_local, tmp_path, fmt):
    from palikit.cli.predict import default_model
    from palikit.demo.shapes import make_sample

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        make_sample(i, seed=7).image.save(folder / f"s{i}.png")
    model = default_model(None)
    run_batch(folder, tmp_path / "out", "detect", model, labels=["circle", "square", "triangle"], fmt=fmt,
              device="cpu", max_new_tokens=32, progress=False)
    rows = {r["id"]: r for r in read_results(tmp_path / "out")}
    pg = PaliGemma.from_pretrained(model, device="cpu")
    found = 0
    for i in range(3):
        dets = rows[f"s{i}.png"]["detections"]
        assert isinstance(dets, list)
        expected = detection_columns(pg.detect(folder / f"s{i}.png", ["circle", "square", "triangle"],
                                               max_new_tokens=32))
        assert [d["label"] for d in dets] == [d["label"] for d in expected]
        for got, want in zip(dets, expected):
            assert got["box"] == pytest.approx(want["box"], abs=1e-3) and len(got["box"]) == 4
        found += len(dets)
    assert found >= 3, "the demo model finds the shapes"


def test_interrupted_batch_keeps_its_parts_and_exits_130(ckpt, tmp_path):
    src = _images(tmp_path / "in", 24)
    out = tmp_path / "out"
    cmd, env = _batch_command(ckpt, src, out)
    # SIGINT as at a terminal even when pytest runs as a background job (which starts with SIGINT ignored)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(done_ids(out)) < 4:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C to the driver
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = done_ids(out)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (SIGINT)" in err and "rerun the same command" in err
    assert "Traceback" not in err
    assert 0 < len(kept) < 24
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{24 - len(kept)} written" in done.stdout and f"{len(kept)} already done" in done.stdout
    left = 24 - len(kept)
    assert "batch ocr" in done.stdout and f"{left}/{left}" in done.stdout  # the progress bar, finished
    assert sorted(done_ids(out)) == sorted(f"img{i:03d}.png" for i in range(24))


def test_a_task_added_to_the_task_table_runs_on_ray(ckpt, ray_local, tmp_path):
    """One `register(Task(...))` entry with ray=True is a batch task: its argument comes from the rows
    (or the run), and the rows equal `pg.task` on the same images."""
    from palikit.tasks.registry import Arg, Task, register, unregister

    register(Task("colour_of", lambda shape, lang: f"answer {lang} what colour is the {shape}", "Colour of a shape.",
                  (Arg("shape", noun="a shape"),), lang=True, ray=True))
    try:
        src = _images(tmp_path / "in", 3)
        rows = [{"id": f"r{i}", "image": str(src / f"img{i:03d}.png"), "shape": s}
                for i, s in enumerate(["circle", "square", "circle"])]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = run_batch(tmp_path / "rows.jsonl", tmp_path / "out", "colour_of", str(ckpt), batch_size=2,
                            device="cpu", max_new_tokens=5, progress=False)
        assert (summary.written, summary.failed) == (3, 0)
        got = {r["id"]: r for r in read_results(tmp_path / "out", task="colour_of")}
        pg = PaliGemma.from_pretrained(ckpt, device="cpu")
        for r in rows:
            want = pg.task("colour_of", r["image"], r["shape"], max_new_tokens=5)
            assert (got[r["id"]]["prompt"], got[r["id"]]["text"]) == (want.prompt, want.text)
    finally:
        unregister("colour_of")


def test_adapter_is_merged_by_the_workers_and_keys_the_resume(ckpt, ray_local, tmp_path, capsys):
    """`palikit batch --adapter`: every worker merges the LoRA adapter (same text as
    `PaliGemma.from_pretrained(adapter=...)`, not the base's); base and adapter are separate jobs in one
    folder; a folder that is no adapter fails before Ray with the reason."""
    import torch

    from palikit.cli import main
    from palikit.weights.adapter import save_lora_adapter
    from palikit.train.modes import all_linear_targets, inject_lora
    from palikit.weights.hf import load_hf_checkpoint

    base = load_hf_checkpoint(ckpt)
    model = inject_lora(base, all_linear_targets(base), rank=4, alpha=8.0)
    with torch.no_grad():  # a large random adapter, so the answers surely change
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.5)
    adapter = save_lora_adapter(model, tmp_path / "adapter", {"rank": 4, "alpha": 8.0}, base_model=str(ckpt))
    src = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    with_adapter = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=6, progress=False,
                             adapter=adapter)
    plain = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=6, progress=False)
    assert (with_adapter.written, plain.written, plain.skipped) == (3, 3, 0)
    again = run_batch(src, out, "caption", str(ckpt), device="cpu", max_new_tokens=6, progress=False, adapter=adapter)
    assert (again.written, again.skipped) == (0, 3)
    pg_adapter = PaliGemma.from_pretrained(ckpt, device="cpu", adapter=adapter)
    pg_base = PaliGemma.from_pretrained(ckpt, device="cpu")
    rows = read_results(out)
    assert len(rows) == 6
    texts = {}
    for r in rows:
        texts.setdefault(r["id"], set()).add(r["text"])
    for i in range(3):
        name = f"img{i:03d}.png"
        want = pg_adapter.predict(src / name, "caption en", max_new_tokens=6).text
        base = pg_base.predict(src / name, "caption en", max_new_tokens=6).text
        assert want != base and texts[name] == {want, base}
    assert main(["batch", "--input", str(src), "--output", str(tmp_path / "o2"), "--task", "ocr", "--model", str(ckpt),
                 "--adapter", str(tmp_path / "in"), "--device", "cpu"]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err


def test_several_adapters_in_one_run_one_row_per_input_and_adapter(ckpt, ray_local, tmp_path, capsys):
    """`palikit batch --adapter a=PATH --adapter b=PATH`: every input runs on each adapter (unmerged, one
    engine), one row each with an 'adapter' column whose text equals the model with that adapter merged;
    a rerun skips them all; the summary says what was written per adapter."""
    import torch

    from palikit.cli import main
    from palikit.train.modes import all_linear_targets, inject_lora
    from palikit.weights.adapter import save_lora_adapter
    from palikit.weights.hf import load_hf_checkpoint

    paths = {}
    for seed, name in enumerate(("a", "b")):
        model = inject_lora(load_hf_checkpoint(ckpt), all_linear_targets(load_hf_checkpoint(ckpt)), rank=4, alpha=8.0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # large random adapters, so the answers surely differ
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        paths[name] = save_lora_adapter(model, tmp_path / name, {"rank": 4, "alpha": 8.0}, base_model=str(ckpt))
    src = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    args = ["batch", "--input", str(src), "--output", str(out), "--task", "caption", "--model", str(ckpt),
            "--device", "cpu", "--max-new-tokens", "6", "--no-progress",
            "--adapter", f"a={paths['a']}", "--adapter", f"b={paths['b']}"]
    assert main(args) == 0
    assert "a: 2 written  b: 2 written" in capsys.readouterr().out
    rows = read_results(out)
    assert sorted((r["id"], r["adapter"]) for r in rows) == [(f"img{i:03d}.png", a) for i in range(2) for a in "ab"]
    for name, path in paths.items():
        merged = PaliGemma.from_pretrained(ckpt, device="cpu", adapter=path)
        for r in (r for r in rows if r["adapter"] == name):
            assert r["text"] == merged.predict(src / r["id"], "caption en", max_new_tokens=6).text
    assert {r["text"] for r in rows if r["adapter"] == "a"} != {r["text"] for r in rows if r["adapter"] == "b"}
    assert main(args) == 0
    assert "0 written" in capsys.readouterr().out and len(read_results(out)) == 4  # resumed: nothing ran again
