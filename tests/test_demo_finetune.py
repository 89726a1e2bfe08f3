"""The bundled demo model is a base worth fine-tuning (issue 19): the README's fine-tuning example --
`palikit.demo.finetune_set` (two shape classes it never saw, ring and diamond, at free positions)
then `palikit train recipes/demo-v2-finetune.yaml` -- run smaller here (fewer images and steps, CI
time), and the held-out part's detect mAP@0.5, scored by `palikit eval`, must clear FLOOR (the
README's full-size run and its figures: README "Fine-tuning the demo model")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from palikit.cli import main
from palikit.demo.finetune_set import write_finetune_set

pytestmark = pytest.mark.slow  # a training run and an eval

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, STEPS = 150, 40, 150
FLOOR = 0.3


def test_the_demo_model_learns_two_new_classes_in_a_short_fine_tune(tmp_path):
    data = tmp_path / "newshapes"
    summary = write_finetune_set(data, N_TRAIN, N_TEST)
    assert summary["train"]["images"] == N_TRAIN and summary["test"]["instances"] > N_TEST
    assert main(["train", str(ROOT / "recipes" / "demo-v2-finetune.yaml"), f"train_data={data / 'train.jsonl'}",
                 f"output_dir={tmp_path / 'run'}", f"max_steps={STEPS}", "progress=false", "device=cpu"]) == 0
    before, after = tmp_path / "before", tmp_path / "after"
    assert main(["eval", str(data / "test_coco.json"), "--task", "detect", "--device", "cpu",
                 "--out", str(before)]) == 0
    assert main(["eval", str(data / "test_coco.json"), "--task", "detect", "--model", str(tmp_path / "run" / "final"),
                 "--device", "cpu", "--out", str(after)]) == 0
    m0 = json.loads((before / "report.json").read_text())["metrics"]
    m1 = json.loads((after / "report.json").read_text())["metrics"]
    assert m0["map50"] < 0.1  # the base model has never seen these classes
    assert m1["map50"] >= FLOOR, (m0, m1)
