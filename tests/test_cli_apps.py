"""The thin CLI commands over the apps: `palikit train` and `palikit eval` end to end on a tiny
checkpoint (the libraries themselves are tested in their own files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from palikit.cli import main
from palikit.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli-tiny"), family="pg1")


@pytest.fixture
def ocr_jsonl(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": "ocr", "suffix": f"text {i}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def test_train_cli_runs_a_config_with_overrides(ckpt, ocr_jsonl, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {ckpt}\ntrain_data: {ocr_jsonl}\noutput_dir: {tmp_path / 'run'}\nmax_steps: 5\n"
                   "batch_size: 2\nprogress: false\n")
    assert main(["train", str(cfg), "max_steps=2", "lr=1e-3"]) == 0
    assert "final checkpoint" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "config.json").exists()
    assert main(["train", str(cfg), "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_eval_cli_writes_report_and_resumes(ckpt, ocr_jsonl, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(ocr_jsonl), "--task", "ocr", "--model", str(ckpt), "--out", str(out), "--device", "cpu",
            "--max-new-tokens", "4", "--price-per-hour", "2.0"]
    assert main(args) == 0
    headline = capsys.readouterr().out
    assert "ocr accuracy" in headline and "% (3 images, 0 failed)" in headline  # percent, said once
    assert (out / "report.md").exists()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert main(args) == 0  # resumes: nothing new to predict
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
