"""Issue 37's pre-flight: `palikit check DATA --model M` and the start of `palikit train` say, before
any step, what palikit knows about a fine-tune: words the base tokenizer spells piece by piece or cannot
write, what the model card says the model knows (the bundled model: its 4x4 grid, its words, 112 px),
epochs, a missing validation split, class balance and box sizes. On main every fine-tune on the
newcomer's own data ran to zero with no word about why."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from palikit.cli import main
from palikit.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rings(tmp_path_factory):
    """Rings and diamonds at free positions (the issue's newcomer data), as COCO."""
    from lab.demo.finetune_set import write_finetune_set

    out = tmp_path_factory.mktemp("newshapes")
    write_finetune_set(out, n_train=16, n_test=0, n_val=4)
    return out


def _rows(tmp_path, rows, name="t.jsonl"):
    Image.new("RGB", (112, 112), (20, 90, 200)).save(tmp_path / "a.png")
    p = tmp_path / name
    p.write_text("".join(json.dumps({"image": "a.png", **r}) + "\n" for r in rows))
    return p


def _findings(report):
    return {f.check: (f.level, f.finding) for f in report.findings}


def test_rings_at_free_positions_on_the_bundled_model(rings, capsys, monkeypatch):
    """The newcomer's detect data: the labels are spelled letter by letter, no box is on the model's grid,
    there is no validation split; `--strict` fails, without it the table and the verdict are printed."""
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    rc = main(["check", str(rings / "train_coco.json"), "max_steps=20", "batch_size=8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ring -> r·i·n·g" in out and "diamond -> d·i·a·m·o·n·d" in out
    assert "lie on the model's 4x4 grid" in out and "expect detect mAP near 0" in out
    assert "val_fraction=0.1" in out
    assert "pre-flight: 4 warning(s) (labels, positions, box sizes, validation)" in out
    with pytest.raises(SystemExit) as e:
        main(["check", str(rings / "train_coco.json"), "--strict"])
    assert e.value.code == 1
    # with the validation split the recipe now has: that warning goes
    from palikit.cli.check import run_check

    cfg = TrainConfig(train_data=str(rings / "train_coco.json"), val_data=str(rings / "validation_coco.json"))
    got = _findings(run_check(cfg, lambda m: None))
    assert got["validation"][0] == "info" and got["positions"][0] == "warn" and got["labels"][0] == "warn"
    assert got["epochs"][1].startswith("2 steps x 8 = 16 examples over 16: 1.00 epochs")


def test_words_the_tokenizer_cannot_write_and_prompts_it_never_saw(tmp_path):
    from palikit.cli.check import run_check

    rows = [{"prefix": "Detect cat", "suffix": "<loc0000><loc0000><loc0512><loc0512> cat"},
            {"prefix": "ocr", "suffix": "café"}, {"prefix": "ocr", "suffix": "CAT"}] * 4
    cfg = TrainConfig(train_data=str(_rows(tmp_path, rows)), batch_size=2, max_steps=400)
    got = _findings(run_check(cfg, lambda m: None))
    level, text = got["prompts"]
    assert level == "warn" and "'Detect' (it knows 'detect')" in text
    level, text = got["answers"]
    assert level == "warn" and "<unk>" in text and "'café'" in text
    assert got["epochs"][0] == "warn" and "400 steps x 2 = 800 examples over 12: 66.67 epochs" in got["epochs"][1]
    assert got["labels"][0] == "warn" and "cat -> c·a·t" in got["labels"][1]  # the demo knows CAT, not cat
    assert got["positions"] == ("ok", "4 of 4 boxes (100%) lie on the model's 4x4 grid of 28 px cells")


def test_class_balance_and_tiny_boxes(tmp_path):
    from palikit.cli.check import run_check

    box = "<loc0100><loc0100><loc0110><loc0110>"  # 1 % of the side: 1 px at 112 px
    rows = [{"prefix": "detect circle ; square", "suffix": f"{box} circle"}] * 30
    rows += [{"prefix": "detect circle ; square", "suffix": f"{box} square"}]
    cfg = TrainConfig(train_data=str(_rows(tmp_path, rows)), batch_size=2, max_steps=10)
    got = _findings(run_check(cfg, lambda m: None))
    assert got["class balance"][0] == "warn" and "'square' has 1 against 'circle''s 30" in got["class balance"][1]
    assert got["box sizes"][0] == "warn" and "under half a patch" in got["box sizes"][1]


def test_train_prints_the_table_first_and_strict_stops_before_a_step(rings):
    from palikit.train.preflight import PreflightFailed
    from palikit.train.trainer import train

    logs = []
    cfg = TrainConfig(train_data=str(rings / "train_coco.json"), output_dir=str(rings / "run"), batch_size=8,
                      max_steps=1, progress=False, plot=False, preflight="strict", device="cpu")
    with pytest.raises(PreflightFailed, match=r"stopped before training .*preflight=warn lets it run anyway"):
        train(cfg, log=logs.append)
    assert any("pre-flight" in m for m in logs) and not any(m.startswith("step 1/") for m in logs)
    assert not (rings / "run" / "checkpoints").exists()


def test_codes_seen_once_cannot_be_read_by_the_bundled_model(tmp_path):
    """The newcomer's OCR of 4-character codes ran to exact match 0.000 with "ready" from nothing: the
    bundled card says it recognises words as wholes (`reading: words`), so answers seen once are a warning;
    ten words seen many times (the README's loop, 70.8 % exact match) are not."""
    from palikit.cli.check import run_check

    codes = [{"prefix": "ocr", "suffix": f"{i:04d}X"} for i in range(20)]
    words = [{"prefix": "ocr", "suffix": w} for w in ("DOG", "CAR", "BEE", "COW") * 5]
    for rows, level in ((codes, "warn"), (words, "ok")):
        cfg = TrainConfig(train_data=str(_rows(tmp_path, rows)), batch_size=2, max_steps=10)
        got = _findings(run_check(cfg, lambda m: None))
        assert got["reading"][0] == level, got["reading"]
    assert "20 of 20 text answers appear once" in _findings(run_check(
        TrainConfig(train_data=str(_rows(tmp_path, codes)), batch_size=2), lambda m: None))["reading"][1]
