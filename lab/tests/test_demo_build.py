"""The demo model's recipe inputs, built small: tokenizer, mask codec, data splits (JSONL + COCO),
initial checkpoint; `palikit train` on them and the exported model loads with its codec."""

from __future__ import annotations

import json

import pytest

from palikit.api import PaliGemma
from palikit.cli import main
from lab.demo.build import build
from palikit.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # builds and trains the whole demo pipeline


def test_build_train_and_load_the_demo_pipeline(tmp_path):
    summary = build(tmp_path / "demo", n_train=24, n_val=4, n_test=4, codec_images=24, codec_steps=20)
    root = tmp_path / "demo"
    tok = Tokenizer.from_file(root / "tokenizer.json")
    assert len(tok.loc_ids) == 1024 and len(tok.seg_ids) == 128 and summary["tokenizer_size"] == tok.vocab_size
    for split in ("train", "validation", "test"):
        lines = [json.loads(x) for x in (root / "data" / f"{split}.jsonl").read_text().splitlines()]
        assert {x["task"] for x in lines} >= {"caption", "detect", "segment", "count"}
        for x in lines:  # every target tokenizes without unknown pieces
            assert tok.unk_id not in tok.encode_prompt(x["prefix"], x["suffix"]).ids, x
        coco = json.loads((root / "data" / f"{split}_coco.json").read_text())
        assert coco["annotations"] and {c["name"] for c in coco["categories"]} == {"circle", "square", "triangle"}
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"model: {root / 'init'}\ntrain_data: {root / 'data' / 'train.jsonl'}\n"
                   f"output_dir: {tmp_path / 'run'}\nbatch_size: 8\nmax_steps: 2\nprogress: false\n")
    assert main(["train", str(cfg)]) == 0
    pg = PaliGemma.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert pg.mask_codec is not None  # the codec travels with the exported checkpoint
    r = pg.segment(root / "data" / "test" / "000000.png", "circle", max_new_tokens=8)
    assert r.prompt == "segment circle"
    from lab.demo.evaluate import TARGETS, markdown, scorecard

    results = scorecard(pg, root / "data", tmp_path / "eval", limit=2, batch_size=4)
    assert set(results) == set(TARGETS)
    table = markdown(results)
    assert table.count("\n") == len(TARGETS) + 1 and "| detect | map50 |" in table


def test_install_refuses_a_model_below_target_and_replaces_atomically(tmp_path):
    import pytest

    from lab.demo.evaluate import REQUIRED_FILES, TARGETS, install

    model = tmp_path / "final"
    model.mkdir()
    for name in REQUIRED_FILES:
        (model / name).write_text(name)
    good = {task: {metric: target + 0.05} for task, (metric, target) in TARGETS.items()}
    bad = {**good, "ocr": {"exact_match": 0.5}}
    dest = tmp_path / "assets" / "demo-model"
    with pytest.raises(ValueError, match="ocr"):
        install(model, bad, dest)
    assert not dest.exists()
    (dest).mkdir(parents=True)
    (dest / "stale.bin").write_text("old model")
    install(model, good, dest, n_test=500)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*REQUIRED_FILES, "scorecard.json", "README.md"])
    card = json.loads((dest / "scorecard.json").read_text())
    assert card["ocr"]["exact_match"] == TARGETS["ocr"][1] + 0.05 and card["test_images"] == 500
    assert "| ocr | exact_match |" in (dest / "README.md").read_text()
    assert install(model, bad, dest, force=True) == dest  # --force ships it anyway
    forced = json.loads((dest / "scorecard.json").read_text())
    assert forced["missed_targets"] == {"ocr": 0.5} and card["missed_targets"] == {}
    assert "Below target on: ocr (0.500 < 0.8)" in (dest / "README.md").read_text()
