"""Issue 37, "the fine-tuning loop tells the truth", training side: the best checkpoint is the one a
user gets (`final/` = best, `last/` kept), any trainer checkpoint becomes a model folder
(`palikit export`) and `--model` on one says so, early stopping, a validation split held out of the
training data, resume refuses another recipe, and warnings that say what the run does not already do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from palikit.train.config import TrainConfig
from palikit.train.trainer import train
from helpers.train import run_config, run_kwargs, setup_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(peak: int):
    """A metric hook whose `score` is best at step `peak` (so the best checkpoint is known in advance)."""
    return lambda model, val, trainer: {"score": -abs(trainer.step - peak)}


def _weights(folder):
    return load_file(folder / "model.safetensors")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_final_is_the_best_checkpoint_and_last_is_kept(tmp_path, capsys):
    """issue 37: `final/` was the last step (val 2.34) while best.json pointed at step 100 (val 2.26),
    which existed only as a trainer state. Now final/ = the best checkpoint, last/ = the last step,
    and `palikit export` turns the best checkpoint into the same folder."""
    from palikit.cli import main

    setup_run(tmp_path)
    val = str(tmp_path / "data" / "train.jsonl")
    cfg = run_config(tmp_path, max_steps=4, eval_every=1, val_data=val, best_metric="score", best_mode="max",
                     task_metric=False, plot=False)
    logs = []
    final = train(cfg, **{**run_kwargs(), "metric_fn": _scores(2), "log": logs.append})
    out = tmp_path / "out"
    assert json.loads((out / "best.json").read_text())["checkpoint"] == "checkpoints/step-00000002"
    assert not _same(_weights(final), _weights(out / "last")), "final/ must not be the last step"
    assert any(m.startswith("final/: the best checkpoint by score") for m in logs), logs
    # the export command on the best checkpoint writes the very same model
    assert main(["export", str(out / "checkpoints" / "step-00000002"), "--out", str(tmp_path / "exp")]) == 0
    assert _same(_weights(final), _weights(tmp_path / "exp"))
    assert (tmp_path / "exp" / "config.json").is_file()
    assert main(["export", str(out), "--out", str(tmp_path / "exp2")]) == 0  # a run folder: its best checkpoint
    assert _same(_weights(final), _weights(tmp_path / "exp2"))
    assert main(["export", str(out), "--out", str(tmp_path / "exp2")]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


def test_keep_best_false_and_no_validation_give_the_last_step(tmp_path):
    setup_run(tmp_path)
    train(run_config(tmp_path, max_steps=2, plot=False), **run_kwargs())
    out = tmp_path / "out"
    assert (out / "last").is_symlink() and (out / "last" / "model.safetensors").is_file()  # last/ = final/
    cfg = run_config(tmp_path, "nobest", max_steps=3, eval_every=1, val_data=str(tmp_path / "data" / "train.jsonl"),
                     best_metric="score", best_mode="max", task_metric=False, plot=False, keep_best=False)
    train(cfg, **{**run_kwargs(), "metric_fn": _scores(1)})
    assert not (tmp_path / "nobest" / "last").exists()


def test_lora_best_checkpoint_exports_merged(tmp_path):
    """LoRA: final/ (the best) is the base with the best step's adapter merged, adapter/ that adapter."""
    from palikit.weights.adapter import read_adapter

    setup_run(tmp_path)
    cfg = run_config(tmp_path, max_steps=3, eval_every=1, val_data=str(tmp_path / "data" / "train.jsonl"),
                     best_metric="score", best_mode="max", task_metric=False, plot=False, mode="lora", lr=5e-2)
    final = train(cfg, **{**run_kwargs(), "metric_fn": _scores(1)})
    out = tmp_path / "out"
    from palikit.train.export import export_checkpoint

    export_checkpoint(out / "checkpoints" / "step-00000001", tmp_path / "exp", log=lambda m: None)
    assert _same(_weights(final), _weights(tmp_path / "exp"))
    assert not _same(_weights(final), _weights(out / "last"))
    assert read_adapter(out / "adapter")[0]["r"] == 8


def test_model_on_a_trainer_checkpoint_names_the_export_command(tmp_path):
    """issue 37: `palikit eval --model runs/x/checkpoints/step-00000100` said only "point --model at
    the checkpoint folder"."""
    from palikit.weights.resolve import resolve

    setup_run(tmp_path)
    train(run_config(tmp_path, max_steps=2, save_every=1, plot=False), **run_kwargs())
    step = tmp_path / "out" / "checkpoints" / "step-00000001"
    with pytest.raises(FileNotFoundError, match=rf"palikit export {step} --out DIR.*{tmp_path / 'out' / 'final'}"):
        resolve(str(step))
    with pytest.raises(FileNotFoundError, match=r"training run folder: point --model at .*final"):
        resolve(str(tmp_path / "out"))


def test_early_stopping(tmp_path):
    setup_run(tmp_path)
    logs = []
    cfg = run_config(tmp_path, max_steps=20, eval_every=1, val_data=str(tmp_path / "data" / "train.jsonl"),
                     best_metric="score", best_mode="max", task_metric=False, plot=False, early_stopping_patience=2)
    final = train(cfg, **{**run_kwargs(), "metric_fn": _scores(2), "log": logs.append})
    stop = [m for m in logs if m.startswith("early stopping at step 4/20")]
    assert stop and "best 0 at step 2" in stop[0], logs
    assert json.loads((tmp_path / "out" / "best.json").read_text())["step"] == 2
    assert final.is_dir() and (tmp_path / "out" / "checkpoints" / "step-00000004").is_dir()


def test_val_fraction_holds_out_whole_images(tmp_path):
    from palikit.train.data import Example, holdout

    exs = [Example(f"img{i % 10}.png", f"p{i}", f"s{i}") for i in range(40)]  # 4 rows per image
    train_, val, k, n = holdout(exs, 0.2, seed=1)
    assert (k, n) == (2, 10) and len(val) == 8 and len(train_) == 32
    assert not {e.image for e in train_} & {e.image for e in val}
    assert holdout(exs, 0.2, seed=1)[1] == val  # seeded
    setup_run(tmp_path)
    logs = []
    train(run_config(tmp_path, max_steps=1, plot=False, val_fraction=0.25, batch_size=2), **{**run_kwargs(),
                                                                                             "log": logs.append})
    assert any(m.startswith("val_fraction=0.25: 1 of 4 images (1 examples) held out") for m in logs), logs
    assert any(m.startswith("eval step 1: val_loss") for m in logs)
    with pytest.raises(Exception, match="val_fraction holds out part of train_data"):
        TrainConfig(val_fraction=0.1, val_data="v.jsonl")


def test_resume_refuses_another_recipe(tmp_path):
    """issue 37: resume silently accepted a changed learning rate, batch size and step count."""
    from palikit.train.resume import RecipeChanged

    setup_run(tmp_path)
    train(run_config(tmp_path, max_steps=2, plot=False), **run_kwargs())
    with pytest.raises(RecipeChanged, match=r"changed lr \(0.003 -> 0.001\), batch_size \(4 -> 2\), max_steps "
                                            r"\(2 -> 3\).*resume=force"):
        train(run_config(tmp_path, max_steps=3, lr=1e-3, batch_size=2, plot=False), **run_kwargs())
    with pytest.raises(RecipeChanged, match="another mode: .*use another output_dir or resume=false"):
        train(run_config(tmp_path, max_steps=3, mode="lora", plot=False), **run_kwargs())
    logs = []
    train(run_config(tmp_path, max_steps=3, plot=False, log_every=5, resume="force"),
          **{**run_kwargs(), "log": logs.append})
    assert "resume=force: continuing with max_steps (2 -> 3)" in logs
    assert any(m.startswith("resumed from") and "(step 2/3)" in m for m in logs), logs


def test_warnings_never_suggest_what_the_run_already_does():
    """issue 37: the collapse warning suggested mode=full / lora_targets=all-linear to runs using them."""
    from palikit.train.monitor import collapse_warning
    from palikit.train.data import Example

    exs = [Example("x", "ocr", s) for s in ("AB", "CD", "EF", "GH")]
    full = collapse_warning("exact", exs, ["AB"] * 4, 0.5, TrainConfig(mode="full"))
    assert "mode=full" not in full and "lora_targets" not in full and "a higher lr (now 1e-05)" in full
    lora = collapse_warning("exact", exs, ["AB"] * 4, 0.5, TrainConfig(mode="lora", lora_targets="all-linear"))
    assert "lora_targets=all-linear" not in lora and "mode=full" in lora
    attn = collapse_warning("exact", exs, ["AB"] * 4, 0.5, TrainConfig(mode="lora"))
    assert "lora_targets=all-linear" in attn


def test_overfitting_and_a_metric_stuck_at_zero_are_said(tmp_path):
    """issue 37: the full run's plateau warning missed the overfitting (train loss 1.41, val 2.34), and a
    detect mAP of 0.000 at every evaluation gave no warning at all."""
    from palikit.train.monitor import LearningMonitor
    from palikit.train.preflight import Report

    mon = LearningMonitor([], 4, 0.5, 2, config=TrainConfig(mode="full"))
    mon.plateau_warning(10, 2.26)
    mon.plateau_warning(20, 2.34)
    w = mon.overfit_warning(20, 2.34, [1.45, 1.38])
    assert w.startswith("overfitting: train loss 1.4150 against val loss 2.3400") and "mode=lora" in w
    assert mon.overfit_warning(20, 1.5, [1.45]) is None  # close to train loss: fine
    pre = Report()
    pre.add("positions", "0 of 12 boxes lie on the model's 4x4 grid", "warn")
    mon.preflight = pre
    mon.history = [{"detect_map": 0.0}]
    assert mon.stuck_warnings() == []
    mon.history.append({"detect_map": 0.0})
    (stuck,) = mon.stuck_warnings()
    assert stuck.startswith("detect_map has been 0 for 2 evaluations") and "positions: 0 of 12 boxes" in stuck
    mon.history.append({"detect_map": 0.1})
    assert mon.stuck_warnings() == []
