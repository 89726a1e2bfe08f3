"""Quantized modules against the float path: the RTN math and packing, each CPU kernel against the
dequantized weight in `F.linear`, and whole-model logit max-diffs on tiny PaliGemma 1 / 2 and the
bundled demo model (asserted bounds; the figures are in the README's quality table). Compiled decode
== eager on a quantized model is in `test_quant_compile.py` (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from palikit.config import PRESETS
from palikit.model import quant as Q
from palikit.testing import random_linear, random_model



def test_int8_rtn_error_is_at_most_half_a_step_per_row():
    w = torch.randn(48, 96) * 0.1
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() <= 127
    err = (Q.dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("group", [32, 64])
def test_int4_rtn_error_is_at_most_half_a_step_per_group_and_packing_round_trips(group):
    w = torch.randn(32, 128) * 0.1
    packed, s, z = Q.quantize_int4(w, group)
    assert packed.shape == (32, 64) and packed.dtype == torch.uint8 and s.shape == z.shape == (32, 128 // group)
    q = Q.unpack_int4(packed)
    assert q.max() <= 15 and torch.equal(Q.pack_int4(q), packed)
    err = (Q.dequantize_int4(packed, s, z) - w).abs().reshape(32, -1, group)
    assert (err <= s[..., None] / 2 + 1e-6).all()
    # high nibble = even column (the layout torchao / gpt-fast hand to tinygemm)
    assert int(packed[0, 0]) == int(q[0, 0]) * 16 + int(q[0, 1])


@pytest.mark.parametrize("rows", [1, 5, Q.DECODE_ROWS + 7])  # decode GEMV kernel and the int8 x int8 GEMM (per-token activations)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_kernels_match_the_dequantized_weight(rows, bias):
    lin = random_linear(96, 64, bias=bias)
    q = Q.Int8Linear.from_float(lin)
    x = torch.randn(2, rows, 64)
    ref = F.linear(x, q.dequantized_weight(), lin.bias)
    out = q(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)  # bf16 activations
    assert (q.dequantized_weight() - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-7


@pytest.mark.parametrize("rows", [1, 40])
def test_int4_linear_kernel_matches_the_dequantized_weight(rows):
    lin = random_linear(64, 128, seed=1, bias=True)
    q = Q.Int4Linear.from_float(lin, 32)
    x = torch.randn(rows, 128)
    ref = F.linear(x, q.dequantized_weight(), lin.bias)
    torch.testing.assert_close(q(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_gradients_flow_to_the_input_through_a_frozen_quantized_layer():
    for q in (Q.Int8Linear.from_float(random_linear(32, 64)), Q.Int4Linear.from_float(random_linear(32, 64), 32)):
        x = torch.randn(3, 64, requires_grad=True)
        q(x).sum().backward()
        torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0).expand(3, -1))
        assert not any(p.requires_grad for p in q.parameters())


def test_int8_embedding_looks_up_and_projects_like_its_dequantized_table():
    emb = nn.Embedding(100, 64)
    q = Q.Int8Embedding.from_float(emb)
    ids = torch.tensor([[0, 5, 99]])
    w = q.dequantized_weight()
    torch.testing.assert_close(q(ids), w[ids])
    for rows in (1, 3, Q.DECODE_ROWS + 7):  # 8-bit activations per token (fbgemm) or bf16 ones (int8pack)
        h = torch.randn(1, rows, 64)
        ref = F.linear(h, w[:90])
        out = q.project(h, 90)
        assert out.shape == ref.shape and out.dtype == h.dtype
        torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def _inputs(cfg, seed=1, batch=2, text=6):
    g = torch.Generator().manual_seed(seed)
    N = cfg.vision.num_image_tokens
    ids = torch.randint(3, cfg.output_vocab_size - 1, (batch, N + text), generator=g)
    ids[:, :N] = cfg.image_token_index
    pv = torch.rand(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return ids, pv


def _logit_diff(model, bits, group=None, keep_vision=False):
    ids, pv = _inputs(model.config)
    with torch.no_grad():
        ref = model(ids, pv)
        qm = Q.quantize_model(copy.deepcopy(model), Q.plan(model, bits, group, keep_vision))
        out = qm(ids, pv)
    return float((out - ref).abs().max() / ref.abs().max()), qm


# relative logit max-diff bounds (max |q - float| / max |float|), measured then given ~2x headroom
BOUNDS = {("tiny-pg1", 8): 0.02, ("tiny-pg1", 4): 0.15, ("tiny-pg2", 8): 0.08, ("tiny-pg2", 4): 0.6}


@pytest.mark.parametrize("name,bits", list(BOUNDS))
def test_logit_max_diff_on_tiny_models(name, bits):
    model = random_model(PRESETS[name], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(5.0)  # the tiny checkpoints' scale: outputs less degenerate than N(0, 0.02)
    diff, qm = _logit_diff(model, bits, 32 if bits == 4 else None)
    print(f"{name} int{bits}: relative logit max-diff {diff:.4f}")
    assert 0 < diff < BOUNDS[(name, bits)]
    assert Q.weight_bytes(qm) < Q.weight_bytes(model) / (3.3 if bits == 8 else 4.5)


def test_keep_vision_leaves_the_tower_and_projector_in_float():
    model = random_model(PRESETS["tiny-pg2"], seed=0)
    _, qm = _logit_diff(model, 4, 32, keep_vision=True)
    assert isinstance(qm.vision_tower.encoder.layers[0].mlp.fc1, nn.Linear)
    assert isinstance(qm.multi_modal_projector.linear, nn.Linear)
    assert isinstance(qm.language_model.layers[0].mlp.up_proj, Q.Int4Linear)
    assert isinstance(qm.language_model.embed_tokens, Q.Int8Embedding)
    assert qm.quant_spec.kept == ["vision_tower.", "multi_modal_projector."]


@pytest.fixture(scope="module")
def demo():
    from palikit.api import PaliGemma

    return PaliGemma.from_pretrained("demo", device="cpu", dtype="float32")


def _demo_batch(pg, n=4):
    from palikit.demo import shapes

    images = [s.image for s in shapes.iter_split("test", n)]
    pv, _ = pg.processor.preprocess_with_sizes(images)
    prompt = pg.tokenizer.encode_prompt("caption en").ids
    N = pg.model.config.vision.num_image_tokens
    ids = torch.tensor([[pg.model.config.image_token_index] * N + list(prompt)] * n)
    return ids, pv


@pytest.mark.parametrize("bits,bound", [(8, 0.03), (4, 0.1)])  # measured 0.016, 0.069
def test_logit_max_diff_on_the_demo_model(demo, bits, bound):
    ids, pv = _demo_batch(demo)
    with torch.no_grad():
        ref = demo.model(ids, pv)
        qm = Q.quantize_model(copy.deepcopy(demo.model), Q.plan(demo.model, bits))
        out = qm(ids, pv)
    diff = float((out - ref).abs().max() / ref.abs().max())
    print(f"demo int{bits}: relative logit max-diff {diff:.4f}, absolute {float((out - ref).abs().max()):.4f}")
    assert 0 < diff < bound
    assert torch.equal(out[:, -1].argmax(-1), ref[:, -1].argmax(-1))  # the first answer token is unchanged


def test_group_size_that_does_not_divide_a_width_is_refused_with_the_sizes_that_work(demo):
    with pytest.raises(ValueError, match=r"--group-size 128 does not divide.*\[128, 192, 512, 768\].*--group-size 32 or 64"):
        Q.plan(demo.model, 4, 128)
    with pytest.raises(ValueError, match="int4 only"):
        Q.plan(demo.model, 8, 64)
    with pytest.raises(ValueError, match="use one of"):
        Q.plan(demo.model, 4, 48)


def test_default_group_keeps_layers_it_does_not_fit_in_int8():
    model = random_model(PRESETS["tiny-pg2"], seed=0)  # tower width 32: no group of 64 fits it
    misfits = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % Q.DEFAULT_GROUP_SIZE]
    spec = Q.plan(model, 4)
    assert spec.group_size == Q.DEFAULT_GROUP_SIZE and misfits and spec.int8_layers == misfits
    Q.quantize_model(model, spec)
    assert isinstance(model.vision_tower.encoder.layers[0].mlp.fc1, Q.Int8Linear)
    assert isinstance(model.language_model.layers[0].mlp.up_proj, Q.Int4Linear)


def test_quantizing_a_quantized_model_is_refused():
    model = Q.quantize_model(random_model(PRESETS["tiny-pg1"]), Q.plan(random_model(PRESETS["tiny-pg1"]), 8))
    with pytest.raises(ValueError, match="already quantized.*float checkpoint"):
        Q.plan(model, 4)
