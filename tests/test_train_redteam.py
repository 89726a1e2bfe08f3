"""Issue 38, "red team v2", training side: a huge row (T1), a diverging run (T2), a truncated latest
checkpoint (T3), an unreadable image reached mid-run (T8) and corrupt model files (verify on load).
Each fails on the main this was written against (see each docstring)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from palikit.datafiles import DataError
from palikit.train import checkpoint as ck
from palikit.train.guard import TrainingDiverged
from palikit.train.trainer import train
from helpers.train import run_config, run_kwargs, save_tiny_checkpoint, setup_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _add_rows(tmp_path, *rows):
    p = tmp_path / "data" / "train.jsonl"
    with open(p, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return p


def test_a_huge_row_is_refused_with_its_line_before_any_step(tmp_path):
    """T1: one example with a 100,000-character answer reached 23 GB and was OOM-killed on main; the
    length is checked up front against max_len (the model's limit by default) with file and line."""
    setup_run(tmp_path)
    _add_rows(tmp_path, {"image": "images/red.png", "prefix": "caption en", "suffix": "a " * 50_000})
    logs = []
    with pytest.raises(DataError, match=r"train\.jsonl:line 5: 5000\d text tokens, more than max_len=81\d\d"):
        train(run_config(tmp_path, max_steps=2, plot=False), **{**run_kwargs(), "log": logs.append})
    assert not any(m.startswith("step 1/") for m in logs)
    logs = []  # strict_data=false: skipped and reported; long_rows=truncate: cut
    train(run_config(tmp_path, max_steps=1, plot=False, strict_data=False), **{**run_kwargs(), "log": logs.append})
    assert any("skipped 1 example(s) of" in m and "line 5" in m for m in logs), logs
    train(run_config(tmp_path, "cut", max_steps=1, plot=False, long_rows="truncate", max_len=64), **run_kwargs())


def test_a_diverging_run_stops_nonzero_and_exports_nothing(tmp_path):
    """T2: lr=1e30 trained on ("loss nan"), saved and exported an all-NaN model with exit status 0."""
    setup_run(tmp_path)
    logs = []
    cfg = run_config(tmp_path, max_steps=12, lr=1e30, warmup=0, save_every=1, keep_last=5, plot=False,
                     max_nonfinite_steps=2)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, **{**run_kwargs(), "log": logs.append})
    msg = str(e.value)
    assert "the loss or gradient was NaN / inf for 2 steps in a row" in msg and "a lower lr (now 1e+30" in msg
    assert any(m.startswith("warning: step") and "update skipped (1 of 2" in m for m in logs), logs
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "last").exists()
    streak = [int(m.split()[2].rstrip(":")) for m in logs if m.startswith("warning: step")]
    assert streak == list(range(streak[0], streak[0] + 2)), logs
    kept = [int(p.name[5:]) for p in ck.step_folders(out)]
    assert all(k < streak[0] - 1 for k in kept), (kept, streak)  # none whose weights gave the NaN loss
    assert sorted(p.name for p in (out / "checkpoints").glob("diverged-step-*"))  # moved aside, not deleted
    for step in ck.step_folders(out):  # every checkpoint left is finite and verifies
        ck.verify_checkpoint(step)
        ck.read_trainable(step)
    assert e.value.checkpoint == ck.latest_checkpoint(out)


def test_the_cli_exits_3_on_divergence(tmp_path, capsys):
    from palikit.cli import main

    setup_run(tmp_path)
    from palikit.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "tok", "pg1", image_size=28)  # a base with its tokenizer files
    with pytest.raises(SystemExit) as e:  # what `palikit train` exits with
        main(["train", f"model={tmp_path / 'tok'}", f"train_data={tmp_path / 'data' / 'train.jsonl'}",
              f"output_dir={tmp_path / 'run'}", "lr=1e30", "warmup=0", "max_steps=8", "batch_size=4",
              "progress=false", "plot=false", "preflight=off"])
    assert e.value.code == 3
    assert "training stopped at step" in capsys.readouterr().out
    assert not (tmp_path / "run" / "final").exists()


def test_checkpoints_carry_checksums_and_corrupt_bytes_are_caught(tmp_path):
    """T2: resuming from a checkpoint with corrupted bytes trained on silently on main."""
    setup_run(tmp_path)
    train(run_config(tmp_path, max_steps=2, save_every=1, plot=False), **run_kwargs())
    step = tmp_path / "out" / "checkpoints" / "step-00000002"
    sums = json.loads((step / ck.CHECKSUMS).read_text())
    assert set(sums) == {*ck.FILES, ck.CONFIG}
    data = bytearray((step / "trainable.safetensors").read_bytes())
    data[-64:] = b"\xff" * 64  # NaN bytes in the last tensor
    (step / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="trainable.safetensors does not match its checksum"):
        ck.verify_checkpoint(step)
    (step / ck.CHECKSUMS).unlink()  # an older checkpoint without checksums: the finite check still catches it
    with pytest.raises(ck.CheckpointError, match="hold NaN or inf"):
        ck.read_trainable(step)


@pytest.mark.parametrize("damage", ["truncate", "nan-without-checksums"])
def test_resume_skips_a_broken_latest_checkpoint(tmp_path, damage):
    """T3: resuming from a truncated latest checkpoint gave a raw SafetensorError traceback on main and
    the previous intact checkpoint was not used."""
    setup_run(tmp_path)
    cfg = run_config(tmp_path, max_steps=3, save_every=1, keep_last=3, plot=False)
    train(cfg, **run_kwargs())
    latest = tmp_path / "out" / "checkpoints" / "step-00000003"
    f = latest / "trainable.safetensors"
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    else:
        data = bytearray(f.read_bytes())
        data[-64:] = b"\xff" * 64
        f.write_bytes(bytes(data))
        (latest / ck.CHECKSUMS).unlink()
    shutil.rmtree(tmp_path / "out" / "final")
    logs = []
    train(run_config(tmp_path, max_steps=3, save_every=1, keep_last=3, plot=False), **{**run_kwargs(),
                                                                                        "log": logs.append})
    skipped = [m for m in logs if m.startswith(f"resume: skipped {latest}")]
    assert skipped, logs
    assert ("does not match its checksum" if damage == "truncate" else "NaN or inf") in skipped[0]
    assert any(m.startswith("resumed from") and "step-00000002 (step 2/3)" in m for m in logs), logs
    ck.verify_checkpoint(latest)  # step 3 was trained again and written whole


def test_every_checkpoint_broken_is_an_error_not_a_restart(tmp_path):
    setup_run(tmp_path)
    train(run_config(tmp_path, max_steps=1, plot=False), **run_kwargs())
    step = tmp_path / "out" / "checkpoints" / "step-00000001"
    (step / "optimizer.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint .*resume=false starts over"):
        train(run_config(tmp_path, max_steps=2, plot=False), **run_kwargs())


def _truncated_png(path):
    """A PNG whose header reads fine and whose pixel data is cut: found only when decoded."""
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_image_mid_run_is_skipped_or_saved_before_stopping(tmp_path):
    """T8: one corrupt image aborted training when first reached (step 17 of 30) even with
    strict_data=false, and with save_every=0 nothing was saved."""
    setup_run(tmp_path)
    _truncated_png(tmp_path / "data" / "images" / "bad.png")
    _add_rows(tmp_path, *[{"image": "images/bad.png", "prefix": "caption en", "suffix": "a red square"}])
    logs = []
    cfg = run_config(tmp_path, max_steps=6, plot=False, strict_data=False, batch_size=2)
    train(cfg, **{**run_kwargs(), "log": logs.append})
    skipped = [m for m in logs if "skipped" in m and "train.jsonl:5: cannot read image" in m]
    assert skipped, logs
    assert any(m.startswith("1 example(s) were skipped at run time") or "example(s) were skipped" in m for m in logs)
    # strict (the default): the run stops at that example, but keeps the steps made before it
    from palikit.train.batches import batch_indices

    seed = next(s for s in range(100) if 4 not in batch_indices(0, 5, 2, s) and 4 in batch_indices(1, 5, 2, s))
    logs = []
    with pytest.raises(ValueError, match=r"step 2: .*train\.jsonl:5: cannot read image"):
        train(run_config(tmp_path, "strict", max_steps=6, plot=False, batch_size=2, seed=seed),
              **{**run_kwargs(), "log": logs.append})
    saved = [m for m in logs if m.startswith("error at step") and "saved" in m]
    assert saved, logs
    assert ck.list_checkpoints(tmp_path / "strict")


def test_model_files_are_verified_on_load(tmp_path):
    """issue 38: corrupted weights loaded silently; bad checkpoint or config files gave raw tracebacks."""
    from palikit.weights.hf import CheckpointError
    from palikit.weights.load import load_checkpoint
    from palikit.weights.resolve import resolve

    folder = save_tiny_checkpoint(tmp_path / "m")
    good = (folder / "model.safetensors").read_bytes()
    cfg = (folder / "config.json").read_text()

    def load():
        return load_checkpoint(resolve(str(folder), need_tokenizer=False))

    load()
    os.truncate(folder / "model.safetensors", len(good) // 2)
    with pytest.raises(CheckpointError, match="safetensors file is truncated or corrupt"):
        load()
    data = bytearray(good)
    data[-256:] = b"\xff" * 256
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weight tensor\(s\) hold NaN or inf"):
        load()
    (folder / "model.safetensors").write_bytes(good)
    for bad, what in [("[1, 2]", "expected a JSON object"), ('{"text_config": "x"}', "text_config must be an object"),
                      ('{"vision_config": {"hidden_size": "big"}}', "vision_config.hidden_size must be a positive"),
                      ("{oops", "not valid JSON")]:
        (folder / "config.json").write_text(bad)
        with pytest.raises(ValueError, match=what):
            load()
    (folder / "config.json").write_text(cfg)
    assert isinstance(load(), torch.nn.Module)
