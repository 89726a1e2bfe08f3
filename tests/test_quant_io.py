"""Quantized folders on disk and everything that loads them: quantize -> save -> load gives identical
logits, the config.json block, `--quantize` at load, LoRA adapters over a quantized base (unmerged,
proven against the dequantized float model with the adapter merged), training on a quantized base
(LoRA yes, full fine-tuning refused), and each bad input's clear error."""

from __future__ import annotations

import json

import pytest
import torch

from palikit.api import PaliGemma
from palikit.model import quant as Q
from palikit.testing import make_tiny_checkpoint
from palikit.weights.hf import load_hf_checkpoint
from palikit.weights.quantized import CheckpointError, save_quantized


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "pg2", "pg2", image_size=28)


def _inputs(cfg, batch=2, text=5):
    g = torch.Generator().manual_seed(3)
    N = cfg.vision.num_image_tokens
    ids = torch.randint(3, cfg.output_vocab_size - 1, (batch, N + text), generator=g)
    ids[:, :N] = cfg.image_token_index
    return ids, torch.rand(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1


@pytest.mark.parametrize("bits,group,keep_vision", [(8, None, False), (4, 32, False), (4, None, True)])
def test_quantize_save_load_gives_identical_logits(tiny, tmp_path, bits, group, keep_vision):
    model = load_hf_checkpoint(tiny)
    Q.quantize_model(model, Q.plan(model, bits, group, keep_vision))
    ids, pv = _inputs(model.config)
    with torch.no_grad():
        before = model(ids, pv)
    save_quantized(model, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert block["format"] == "palikit" and block["bits"] == bits and block["keep_vision"] == keep_vision
    assert block["group_size"] == (None if bits == 8 else group or Q.DEFAULT_GROUP_SIZE)
    loaded = load_hf_checkpoint(tmp_path / "q")
    assert Q.is_quantized(loaded) and loaded.quant_spec == model.quant_spec
    with torch.no_grad():
        after = loaded(ids, pv)
    assert torch.equal(before, after)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_from_pretrained_quantize_at_load_equals_quantizing_the_loaded_model(tiny):
    pg = PaliGemma.from_pretrained(tiny, device="cpu", dtype="float32", quantize="int4", group_size=32)
    ref = load_hf_checkpoint(tiny)
    Q.quantize_model(ref, Q.plan(ref, 4, 32))
    ids, pv = _inputs(ref.config)
    with torch.no_grad():
        assert torch.equal(pg.model(ids, pv), ref(ids, pv))
    assert pg.quantization == "int4 (group 32)"
    with pytest.raises(ValueError, match="--quantize 'int3': use int8, int4 or none"):
        PaliGemma.from_pretrained(tiny, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="group_size / keep_vision apply with quantize"):
        PaliGemma.from_pretrained(tiny, device="cpu", group_size=32)


def test_a_quantized_folder_refuses_quantize_at_load_and_a_contradicting_block(tiny, tmp_path):
    model = load_hf_checkpoint(tiny)
    save_quantized(Q.quantize_model(model, Q.plan(model, 4, 32)), tmp_path / "q")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (tmp_path / "q" / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(ValueError, match="already quantized \\(int4 \\(group 32\\)\\); load it without --quantize"):
        PaliGemma.from_pretrained(tmp_path / "q", device="cpu", quantize="int8")
    cfg_path = tmp_path / "q" / "config.json"
    good = json.loads(cfg_path.read_text())
    for change, pattern in (({"bits": 8, "group_size": None}, "disagrees with the tensors"),
                            ({"group_size": 64}, "disagrees with the tensors.*quantize the float checkpoint again"),
                            ({"keep_vision": True, "kept": []}, "disagrees"),
                            ({"format": "gptq"}, "not palikit's"),
                            ({"bits": 3}, "int8 or int4"),
                            ({"version": 2}, "newer than this palikit")):
        cfg = dict(good, quantization={**good["quantization"], **change})
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=pattern):
            load_hf_checkpoint(tmp_path / "q")


def _random_adapter(tiny, tmp_path):
    from palikit.weights.adapter import save_lora_adapter
    from palikit.train.modes import inject_lora

    targets = r"language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.up_proj)"
    model = inject_lora(load_hf_checkpoint(tiny), targets, rank=4, alpha=8.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return save_lora_adapter(model, tmp_path / "adapter", {"rank": 4, "alpha": 8.0})


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_over_a_quantized_base_stays_an_unmerged_delta(tiny, tmp_path, bits):
    from palikit.weights.adapter import LoRADelta, merge_adapter

    adapter = _random_adapter(tiny, tmp_path)
    model = load_hf_checkpoint(tiny)
    save_quantized(Q.quantize_model(model, Q.plan(model, bits, 32 if bits == 4 else None)), tmp_path / "q")
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (tmp_path / "q" / name).write_bytes((tiny / name).read_bytes())
    pg = PaliGemma.from_pretrained(tmp_path / "q", device="cpu", dtype="float32", adapter=adapter)
    q_proj = pg.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRADelta) and isinstance(q_proj.base, Q.Int8Linear if bits == 8 else Q.Int4Linear)
    # reference: the dequantized base in float with the adapter merged in
    ref = merge_adapter(Q.dequantize_model(load_hf_checkpoint(tmp_path / "q")), adapter)
    ids, pv = _inputs(ref.config)
    with torch.no_grad():
        out, want = pg.model(ids, pv), ref(ids, pv)
        plain = load_hf_checkpoint(tmp_path / "q")(ids, pv)
    err = float((out - want).abs().max() / want.abs().max())
    assert err < 0.03, err  # the kernels' bf16 activations; the adapter itself moves the logits far more:
    assert float((plain - want).abs().max() / want.abs().max()) > 5 * err
    assert pg.predict(torch.rand(3, 28, 28).numpy().transpose(1, 2, 0).__mul__(255).astype("uint8"),
                      "caption en", max_new_tokens=3).text is not None


def test_training_a_quantized_base_trains_lora_and_refuses_full_fine_tuning(tiny):
    from palikit.train.modes import apply_mode, merge_lora

    model = load_hf_checkpoint(tiny)
    Q.quantize_model(model, Q.plan(model, 8))
    for mode in ("full", "attention", "qlora"):
        with pytest.raises(ValueError, match=f"cannot be fine-tuned \\(mode={mode}\\).*mode=lora"):
            apply_mode(model, mode)
    names = apply_mode(model, "lora", lora_targets="all-linear", lora_rank=4)
    assert names and all(".lora_" in n for n in names)
    ids, pv = _inputs(model.config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = ids[:, -1]
    losses = []
    for _ in range(5):
        logits = model(ids, pv)[:, -2]
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    with torch.no_grad():
        trained = model(ids, pv)
    merge_lora(model)  # export: the adapters fold into the dequantized base at full precision
    assert not Q.is_quantized(model)
    with torch.no_grad():
        merged = model(ids, pv)
    assert float((merged - trained).abs().max() / trained.abs().max()) < 0.03


def test_cli_quantize_at_load_and_its_bad_value(tmp_path, capsys):
    from PIL import Image

    from palikit.cli import main

    image = tmp_path / "x.png"
    Image.new("RGB", (112, 112), (200, 30, 30)).save(image)
    assert main(["caption", str(image), "--quantize", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] is not None
    assert main(["caption", str(image), "--quantize", "int3"]) == 2
    assert "--quantize 'int3': use int8, int4 or none" in capsys.readouterr().err


def test_streaming_and_beam_search_run_on_a_quantized_model():
    from palikit.demo import shapes

    pg = PaliGemma.from_pretrained("demo", device="cpu", quantize="int4")
    float_pg = PaliGemma.from_pretrained("demo", device="cpu")
    image = next(iter(shapes.iter_split("test", 1))).image
    greedy = pg.predict(image, "caption en", max_new_tokens=16)
    assert "".join(pg.stream(image, "caption en", max_new_tokens=16)) == greedy.text
    assert greedy.text == float_pg.predict(image, "caption en", max_new_tokens=16).text  # int4 keeps this answer
    beams = pg.predict(image, "detect circle ; square ; triangle", num_beams=3, max_new_tokens=24)
    assert beams.detections and {d.label for d in beams.detections} <= {"circle", "square", "triangle"}
