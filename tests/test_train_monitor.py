"""Issue 20 item 2: training that tells you when it is not learning. At every eval a validation sample
is answered and scored through palikit.eval (exact match / detection mAP / CIDEr); a collapse to one
answer and a val loss that stops improving are plain warnings; the run ends with a one-line summary."""

from __future__ import annotations

import json

import pytest

from palikit.eval.metrics_text import cider_d
from palikit.train.data import Example
from palikit.train.trainer import train
from helpers.train import run_config, run_kwargs, setup_run, tiny_model, write_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _ex(tmp_path, prefix, suffix, task=""):
    return Example(str(write_images(tmp_path / "im")["red"]), prefix, suffix, "t:1", task)


def test_scores_by_task_through_the_eval_metrics(tmp_path):
    from palikit.train.monitor import CAPTION, DETECT, EXACT, score, task_kind

    texts = [_ex(tmp_path, "answer en how many", s, "count") for s in ("1", "2", "3", "4")]
    assert {task_kind(e) for e in texts} == {EXACT}
    assert score(EXACT, texts, ["1", "2", "x", "y"]) == {"exact_match": 0.5}

    caps = [_ex(tmp_path, "caption en", s) for s in ("a red square", "a blue circle", "two green cats")]
    answers = ["a red square", "a circle", "green cats"]
    assert task_kind(caps[0]) == CAPTION
    assert score(CAPTION, caps, answers)["caption_cider"] == pytest.approx(cider_d(answers, [[e.suffix] for e in caps])[0])

    boxes = ["<loc0000><loc0000><loc0512><loc0512> square", "<loc0100><loc0200><loc0900><loc1000> circle ; "
             "<loc0000><loc0000><loc0300><loc0300> square"]
    dets = [_ex(tmp_path, "detect square ; circle", b) for b in boxes]
    assert task_kind(dets[0]) == DETECT
    assert score(DETECT, dets, boxes) == {"detect_map": pytest.approx(1.0), "detect_map50": pytest.approx(1.0)}
    shifted = ["<loc0600><loc0600><loc1000><loc1000> square", "<loc0900><loc0900><loc1000><loc1000> circle"]
    assert score(DETECT, dets, shifted) == {"detect_map": 0.0, "detect_map50": 0.0}


def test_a_run_that_learns_nothing_warns_and_summarises(tmp_path):
    """Four targets on one image and one prompt: any model gives one answer for all of them (collapse);
    lr 1e-9 leaves val loss flat (plateau); the last line sums the run up."""
    setup_run(tmp_path)
    rows = [{"image": "images/red.png", "prefix": "caption en", "suffix": s}
            for s in ("a red square", "a blue circle", "the green cat", "a yellow dog")]
    val = tmp_path / "data" / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = []
    cfg = run_config(tmp_path, max_steps=4, lr=1e-9, val_data=str(val), eval_every=1, plateau_patience=2,
                     plot=False)
    train(cfg, **{**run_kwargs(), "log": logs.append})
    collapsed = [m for m in logs if m.startswith("warning: predictions collapsed")]
    assert collapsed and "4 of 4 validation answers are" in collapsed[0] and "4 different answers" in collapsed[0]
    plateau = [m for m in logs if m.startswith("warning: val loss has not improved for 2 evaluations")]
    assert len(plateau) == 1 and "best" in plateau[0] and "at step 1" in plateau[0], logs
    evals = [m for m in logs if m.startswith("eval step")]
    assert len(evals) == 4 and all("caption_cider" in m for m in evals)
    summary = logs[-1]
    assert summary.startswith("summary: 4 steps, last train loss ") and "best val_loss " in summary
    assert summary.count("caption_cider ") == 1 and " -> " in summary, summary


def test_summary_without_val_data(tmp_path):
    setup_run(tmp_path)
    logs = []
    train(run_config(tmp_path, max_steps=2, plot=False), **{**run_kwargs(), "log": logs.append})
    assert logs[-1].startswith("summary: 2 steps, last train loss ") and "no val_data" in logs[-1]


def test_generation_failure_turns_the_metric_off_and_resume_keeps_the_history(tmp_path):
    from palikit.train.monitor import LearningMonitor

    mon = LearningMonitor([_ex(tmp_path, "ocr", "CAT")] * 4, 8, 0.5, 2)

    class Broken:
        tokenizer = None  # no encode_prompt: generation cannot start

    metrics, warnings = mon.task_metrics(tiny_model("pg1"), Broken(), "cpu")
    assert metrics == {} and len(warnings) == 1 and warnings[0].startswith("task metric turned off: generating")
    assert mon.task_metrics(tiny_model("pg1"), Broken(), "cpu") == ({}, [])  # said once, then off
    mon.restore([{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 1.5, "exact_match": 0.25},
                 {"step": 2, "val_loss": 1.4, "exact_match": 0.5}])
    assert mon.summary(2, 1.0) == ("summary: 2 steps, last train loss 1.0000, best val_loss 1.4000 (step 2), "
                                   "exact_match 0.250 -> 0.500")
