"""QLoRA: decoder linears frozen in 4-bit NF4 (bitsandbytes, CPU here), only LoRA adapters train,
and the export folds the adapters into the dequantized base at full precision."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from palikit.train.qlora import dequantized_weight, is_4bit
from palikit.train.trainer import Trainer
from helpers.train import run_config, run_kwargs, setup_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_qlora_trains_adapters_over_a_4bit_base_and_exports_merged(tmp_path):
    setup_run(tmp_path)
    cfg = run_config(tmp_path, "qlora", mode="qlora", max_steps=6, lr=5e-3, plot=False,
                     lora_targets="q_proj,v_proj", lora_rank=4)
    trainer = Trainer(cfg, **run_kwargs())
    model = trainer.model
    q = model.language_model.layers[0].self_attn.q_proj.base_layer
    mlp = model.language_model.layers[0].mlp.up_proj
    assert is_4bit(q) and is_4bit(mlp)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == q.in_features * q.out_features // 2  # 4 bits each
    packed = {n: m.weight.data.clone() for n, m in model.named_modules() if is_4bit(m)}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    base_q = dequantized_weight(q).clone()
    losses = [trainer.train_step(step)["loss"] for step in range(cfg.max_steps)]
    assert losses[-1] < losses[0]
    for n, m in model.named_modules():  # the 4-bit base never moved
        if is_4bit(m):
            assert torch.equal(m.weight.data, packed[n]), n
    lora = model.language_model.layers[0].self_attn.q_proj
    delta = lora.get_delta_weight("default").float().detach().clone()
    assert delta.abs().max() > 0
    up = dequantized_weight(mlp).clone()
    final = trainer.export()
    trainer.close()
    exported = load_file(final / "model.safetensors")
    torch.testing.assert_close(exported["language_model.model.layers.0.self_attn.q_proj.weight"], base_q + delta,
                               atol=1e-6, rtol=0)
    # an untargeted quantized layer is exported dequantized, i.e. the 4-bit values the model trained with
    torch.testing.assert_close(exported["language_model.model.layers.0.mlp.up_proj.weight"], up, atol=0, rtol=0)
