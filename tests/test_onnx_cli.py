"""`palikit export`: bad options are refused with a clear message before anything is loaded or written; not
enough disk is refused up front; a failure half-way leaves nothing under the destination (nor an older export
replaced); `--format hub` writes a folder palikit reloads with the same logits; `--adapter` merges a LoRA
adapter into the ONNX graphs exactly as `PaliGemma.from_pretrained(adapter=...)` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from palikit.api import PaliGemma
from palikit.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(["export", *map(str, args)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format 'tflite': choose hub or onnx"),
    (["--format", "onnx", "--opset", "17"], "opset 17 is not supported: choose 18..23"),
    (["--format", "onnx", "--quantize", "q3"], "unsupported quantization 'q3': choose from q8, q4, q4f16"),
    (["--format", "onnx", "--quantize", "q4", "--opset", "18"], "int4 weights, which ONNX has from opset 21"),
    (["--format", "onnx", "--no-fp32"], "leaves nothing to write"),
    (["--quantize", "q4"], "--quantize, --opset and --no-fp32 apply to --format onnx"),
    (["--format", "onnx", "--dtype", "bfloat16"], "--dtype applies to --format hub"),
])
def test_bad_options_are_refused_and_nothing_is_written(tmp_path, capsys, args, message):
    rc, err = run_cli(capsys, "demo", "--out", tmp_path / "out", *args)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for fmt in ("hub", "onnx"):
        rc, err = run_cli(capsys, "demo", "--out", tmp_path / "out", "--format", fmt)
        assert rc == 2 and "already exists; pass --overwrite" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_not_enough_disk_is_refused_before_writing(tmp_path, capsys, monkeypatch):
    import shutil as real_shutil

    from palikit import fileio

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    for fmt in ("hub", "onnx"):
        rc, err = run_cli(capsys, "demo", "--out", tmp_path / "out", "--format", fmt)
        assert rc == 2 and "not enough disk space" in err and "GB is free" in err, err
        assert list(tmp_path.iterdir()) == []


def test_a_quantization_that_would_not_fit_in_memory_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from palikit.onnx import layout

    monkeypatch.setattr(layout, "available_memory", lambda: 2**20)
    rc, err = run_cli(capsys, "demo", "--out", tmp_path / "out", "--format", "onnx", "--quantize", "q8")
    assert rc == 2 and "--quantize q8 of this model needs about" in err and "Use q4" in err, err
    assert list(tmp_path.iterdir()) == []


def test_hub_export_reloads_with_the_same_logits(tmp_path, capsys):
    rc, err = run_cli(capsys, "demo", "--out", tmp_path / "hub")
    assert rc == 0, err
    names = {p.name for p in (tmp_path / "hub").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "vae-oid.npz"} <= names
    a = PaliGemma.from_pretrained("demo", device="cpu", dtype="float32")
    b = PaliGemma.from_pretrained(tmp_path / "hub", device="cpu", dtype="float32")
    ids = torch.tensor([[a.model.config.image_token_index] * 16 + a.tokenizer.encode_prompt("caption en").ids])
    pixels = torch.rand(1, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.model(ids, pixels), b.model(ids, pixels))  # the demo is stored in fp16: kept as is


@pytest.mark.slow
def test_a_failure_half_way_leaves_nothing_and_keeps_the_old_export(tmp_path, capsys, monkeypatch):
    from palikit.onnx import export as onnx_export

    real_graph = onnx_export._graph

    def failing(name, model):
        if name == "embed_tokens":  # the vision encoder is already on disk in the temporary folder
            raise RuntimeError("simulated crash")
        return real_graph(name, model)

    monkeypatch.setattr(onnx_export, "_graph", failing)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["export", "demo", "--format", "onnx", "--out", str(tmp_path / "out"), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]


@pytest.mark.slow
def test_adapter_is_merged_into_the_onnx_graphs(tmp_path, capsys):
    from palikit.onnx.runtime import OnnxPaliGemma
    from palikit.weights.adapter import save_lora_adapter
    from palikit.train.modes import apply_mode

    base = PaliGemma.from_pretrained("demo", device="cpu", dtype="float32")
    apply_mode(base.model, "lora", lora_targets="all-linear")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora_adapter(base.model, tmp_path / "adapter", {"rank": 8, "alpha": 16})
    rc, err = run_cli(capsys, "demo", "--format", "onnx", "--adapter", tmp_path / "adapter", "--out", tmp_path / "x")
    assert rc == 0, err
    merged = PaliGemma.from_pretrained("demo", device="cpu", dtype="float32", adapter=tmp_path / "adapter")
    plain = PaliGemma.from_pretrained("demo", device="cpu", dtype="float32")
    ids = [merged.model.config.image_token_index] * 16 + merged.tokenizer.encode_prompt("caption en").ids
    pixels = torch.rand(1, 3, 112, 112, generator=g) * 2 - 1
    onnx = OnnxPaliGemma(tmp_path / "x").generate(pixels.numpy(), ids, 1, keep_logits=True).logits[0]
    with torch.no_grad():
        want = merged.model(torch.tensor([ids]), pixels)[0, -1].numpy()
        without = plain.model(torch.tensor([ids]), pixels)[0, -1].numpy()
    assert np.abs(onnx - want).max() < 1e-4
    assert np.abs(without - want).max() > 1e-2  # the adapter changes the answer: merging it is what is tested


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "x"], "--adapter apply to a model, not to a trainer checkpoint"),
    (["--final-logit-softcap", "off"], "--final-logit-softcap apply to a model, not to a trainer checkpoint"),
])
def test_model_options_on_a_trainer_checkpoint_are_refused(tmp_path, capsys, extra, message):
    step = tmp_path / "run" / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    (step / "state.json").write_text("{}")
    rc, err = run_cli(capsys, step, "--out", tmp_path / "out", *extra)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_base_model_on_a_model_is_refused(tmp_path, capsys):
    rc, err = run_cli(capsys, "demo", "--out", tmp_path / "out", "--base-model", tmp_path)
    assert rc == 2 and "--base-model applies to a trainer checkpoint" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_trainer_checkpoint_exports_its_merged_model_as_onnx(tmp_path, capsys, one_thread):
    """`palikit export RUN --format onnx` (issue 37's trainer checkpoints): the base with the trained LoRA merged,
    equal within 1e-4 to the Hub export of the same checkpoint; no merged temporary folder left behind."""
    from helpers.train import run_config, run_kwargs, write_dataset

    from palikit.onnx.runtime import OnnxPaliGemma
    from palikit.testing import make_tiny_checkpoint
    from palikit.train.trainer import train

    make_tiny_checkpoint(tmp_path / "base")  # with a tokenizer.json, which the ONNX layout carries
    write_dataset(tmp_path / "data")
    train(run_config(tmp_path, max_steps=2, plot=False, mode="lora", lr=5e-2), **run_kwargs())
    run = tmp_path / "out"  # a run folder: its newest checkpoint
    rc, err = run_cli(capsys, run, "--format", "onnx", "--out", tmp_path / "onnx")
    assert rc == 0, err
    rc, err = run_cli(capsys, run, "--out", tmp_path / "hub")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "data", "hub", "onnx", "out"]
    hub = PaliGemma.from_pretrained(tmp_path / "hub", device="cpu", dtype="float32")
    base = PaliGemma.from_pretrained(tmp_path / "base", device="cpu", dtype="float32")
    cfg = hub.model.config
    ids = [cfg.image_token_index] * cfg.vision.num_image_tokens + hub.tokenizer.encode_prompt("caption en").ids
    S = cfg.vision.image_size
    pixels = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
    onnx = OnnxPaliGemma(tmp_path / "onnx").generate(pixels.numpy(), ids, 1, keep_logits=True).logits[0]
    with torch.no_grad():
        want = hub.model(torch.tensor([ids]), pixels)[0, -1].numpy()
        untrained = base.model(torch.tensor([ids]), pixels)[0, -1].numpy()
    assert np.abs(onnx - want).max() < 1e-4
    assert np.abs(untrained - want).max() > 1e-3  # the trained LoRA is in the export: merging it is what is tested
