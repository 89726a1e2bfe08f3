"""Issue 20 item 7: LoRA adapters in PEFT format that peft + transformers load onto the base checkpoint
(same logits as palikit's LoRA model), palikit loads with `adapter=` / `--adapter`; `all-linear`
targets; `mode=attention` says in the log that it uses SGD and why."""

from __future__ import annotations

import json

import pytest
import torch

from palikit.train.config import TrainConfig
from palikit.train.data import load_jsonl
from palikit.train.trainer import Trainer
from helpers.train import SimpleImageProcessor, WordTokenizer, tiny_model, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, model, logs, **over):
    ds = load_jsonl(write_dataset(tmp_path / "data"))
    kw = dict(output_dir=str(tmp_path / "out"), batch_size=2, max_steps=3, lr=1e-2, warmup=0, progress=False,
              plot=False, log_every=100, model=str(tmp_path / "base"))
    return Trainer(TrainConfig(**{**kw, **over}), model=model, tokenizer=WordTokenizer(),
                   image_processor=SimpleImageProcessor(28), train_set=ds, log=logs.append)


def _inputs(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 20, (2, 9), generator=g)
    ids[:, :4] = model.config.image_token_index
    return ids, torch.rand(2, 3, 28, 28, generator=g) * 2 - 1


def test_all_linear_covers_every_decoder_linear_and_not_the_vision_tower():
    from palikit.train.modes import all_linear_targets

    model = tiny_model("pg2")
    names = all_linear_targets(model)
    layers = model.config.text.num_hidden_layers
    assert len(names) == 7 * layers
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    assert all(n.startswith("language_model.layers.") for n in names)
    from palikit.train.modes import apply_mode

    trainable = apply_mode(model, "lora", lora_targets="all-linear")
    assert len(trainable) == 2 * 7 * layers and not any(n.startswith(("vision_tower", "multi_modal")) for n in trainable)


def test_attention_mode_says_it_uses_sgd_and_why(tmp_path):
    logs = []
    tr = _trainer(tmp_path, tiny_model("pg1"), logs, mode="attention", max_steps=1)
    tr.fit()
    line = [m for m in logs if m.startswith("optimizer sgd")]
    assert len(line) == 1 and "mode=attention" in line[0] and "optimizer=adamw" in line[0], logs
    logs.clear()
    _trainer(tmp_path, tiny_model("pg1"), logs, mode="attention", optimizer="adamw", max_steps=1,
             output_dir=str(tmp_path / "o2")).fit()
    assert any(m.startswith("optimizer adamw (optimizer=adamw)") for m in logs), logs


def test_peft_format_adapter_loads_in_peft_transformers_and_palikit(tmp_path):
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration

    from palikit.api import PaliGemma
    from palikit.testing import make_tiny_checkpoint
    from palikit.train.modes import load_lora_adapter
    from palikit.weights.hf import load_hf_checkpoint

    base_dir = make_tiny_checkpoint(tmp_path / "base", "pg2", image_size=28)
    model = load_hf_checkpoint(base_dir)
    logs = []
    tr = _trainer(tmp_path, model, logs, mode="lora", lora_rank=4, lora_alpha=8.0, lora_targets="all-linear")
    for s in range(3):
        tr.train_step(s)
    line = [m for m in logs if m.startswith("lora_targets=all-linear: adapters on ")]
    assert line == [f"lora_targets=all-linear: adapters on {7 * model.config.text.num_hidden_layers} Linear layers of "
                    "the decoder (attention q/k/v/o and MLP gate/up/down of every layer); the vision tower and "
                    "projector are not included"], logs
    ids, pv = _inputs(model)
    model.eval()
    with torch.no_grad():
        ref = model(ids, pv)  # palikit's LoRA model (adapters not merged)
    tr.export()
    adapter = tmp_path / "out" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert len(cfg["target_modules"]) == 7 * model.config.text.num_hidden_layers

    hf = PaliGemmaForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    lora_b = [n for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(cfg["target_modules"])
    assert all(peft_model.get_parameter(n).abs().sum() > 0 for n in lora_b)  # trained weights arrived
    pos = torch.arange(1, ids.shape[1] + 1)[None].expand(2, -1)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, pixel_values=pv, token_type_ids=torch.zeros_like(ids),
                            position_ids=pos).logits
        assert (theirs[..., : ref.shape[-1]] - ref).abs().max() < 1e-4

    pg = PaliGemma.from_pretrained(base_dir, device="cpu", dtype="float32", adapter=adapter)
    with torch.no_grad():
        assert (pg.model(ids, pv) - ref).abs().max() < 1e-4
    fresh = load_lora_adapter(load_hf_checkpoint(base_dir), adapter)  # unmerged, trainable again
    with torch.no_grad():
        assert (fresh.eval()(ids, pv) - ref).abs().max() < 1e-5


def test_adapter_errors_are_clear(tmp_path):
    from palikit.testing import make_tiny_checkpoint
    from palikit.train.modes import load_lora_adapter
    from palikit.weights.hf import load_hf_checkpoint

    base = make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_lora_adapter(load_hf_checkpoint(base), tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="LoRA adapters only"):
        load_lora_adapter(load_hf_checkpoint(base), tmp_path / "a")


def test_cli_predict_with_adapter(tmp_path, capsys):
    """`palikit ocr --adapter`: the adapter changes the answer to what the LoRA model says."""
    from palikit.api import PaliGemma
    from palikit.cli import main
    from palikit.testing import make_tiny_checkpoint
    from palikit.weights.hf import load_hf_checkpoint

    base = make_tiny_checkpoint(tmp_path / "base", "pg1", image_size=28)
    model = load_hf_checkpoint(base)
    tr = _trainer(tmp_path, model, [], mode="lora", lora_rank=4, lora_targets="all-linear", lr=0.5)
    with torch.no_grad():  # a large random adapter so the answer surely changes
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_(0, 0.5)
    tr.export()
    image = str(tmp_path / "data" / "images" / "red.png")
    want = PaliGemma.from_pretrained(tmp_path / "out" / "final", device="cpu").ocr(image, max_new_tokens=6).text
    plain = PaliGemma.from_pretrained(base, device="cpu").ocr(image, max_new_tokens=6).text
    assert want != plain
    assert main(["ocr", image, "--model", str(base), "--adapter", str(tmp_path / "out" / "adapter"), "--json",
                 "--max-new-tokens", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == want
