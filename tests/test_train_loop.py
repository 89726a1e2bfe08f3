"""End to end: a tiny model overfits 4 examples through `train()` (periodic eval, best
checkpoint, loss-curve PNG, Hub export) and the engine then reproduces their suffixes."""

from __future__ import annotations

import pytest
import json

import torch

from palikit.engine import Engine, GenerationOptions, Request
from palikit.train.collate import load_image
from palikit.train.data import load_jsonl
from palikit.train.trainer import train
from palikit.weights.hf import load_hf_checkpoint
from helpers.train import run_config, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_overfit_then_engine_reproduces_suffixes(tmp_path):
    """The real pieces end to end: a tiny checkpoint with its tokenizer.json and
    preprocessor_config.json, `train(config)` with nothing injected, then palikit's tokenizer,
    image processor and engine on the exported folder."""
    from palikit.preprocess import ImageProcessor
    from palikit.testing import make_tiny_checkpoint
    from palikit.tokenizer import Tokenizer

    make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    write_dataset(tmp_path / "data")
    cfg = run_config(tmp_path, max_steps=100, lr=3e-3, warmup=5, val_data=str(tmp_path / "data" / "train.jsonl"),
                     eval_every=20, save_every=20, keep_last=1)
    final = train(cfg, log=lambda m: None)
    out = tmp_path / "out"
    assert final == out / "final" and (final / "config.json").exists()
    assert (final / "tokenizer.json").exists() and (final / "preprocessor_config.json").exists()
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["value"] < 0.02, best
    assert (out / best["checkpoint"]).is_dir()
    assert len(list((out / "checkpoints").iterdir())) <= 2  # keep_last=1 (+ the best one)

    model = load_hf_checkpoint(final).eval()
    tok = Tokenizer.from_file(final)
    proc = ImageProcessor.from_pretrained(final, default_size=28)
    ds = load_jsonl(tmp_path / "data" / "train.jsonl")
    reqs = []
    for ex in ds.examples:
        pv, _ = proc.preprocess_with_sizes([load_image(ex.image)])
        with torch.no_grad():
            feats = model.embed_images(pv)[0]
        reqs.append(Request(text_ids=tok.encode_prompt(ex.prefix).ids, image_features=feats))
    gens = Engine(model).generate(reqs, GenerationOptions(max_new_tokens=24))
    for ex, g in zip(ds.examples, gens):
        assert g.finished and tok.decode(g.tokens) == ex.suffix, (tok.decode(g.tokens), ex.suffix)


def test_export_corrects_a_stale_image_seq_length(tmp_path):
    """A base folder whose preprocessor_config.json names the wrong number of image tokens (the demo's
    init before that was fixed) must not pass it on: transformers' processor would insert that many."""
    from palikit.testing import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    pre = tmp_path / "base" / "preprocessor_config.json"
    stale = {**json.loads(pre.read_text()), "image_seq_length": 999}
    pre.write_text(json.dumps(stale))
    write_dataset(tmp_path / "data")
    logs = []
    final = train(run_config(tmp_path, max_steps=2, plot=False), log=logs.append)
    n = load_hf_checkpoint(final).config.vision.num_image_tokens
    written = json.loads((final / "preprocessor_config.json").read_text())
    assert written["image_seq_length"] == n != 999
    assert written["size"] == stale["size"]  # the rest of the file is kept
    assert any("image_seq_length 999 -> " in m for m in logs)
