"""palikit == transformers (eager, fp32) on the same random weights, for every on-disk key layout,
the big_vision .npz format, and export -> reload."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers.models import TINY, hf_logits, hf_model, make_batch, write_layout
from palikit.weights.big_vision import load_npz_checkpoint, npz_to_state_dict, state_dict_to_npz
from palikit.weights.export import save_hub_checkpoint
from palikit.weights.hf import CheckpointError, load_hf_checkpoint, read_safetensors

ATOL = 1e-4


def ours_logits(model, batch):
    with torch.no_grad():
        return model(
            batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"], ar_mask=batch["ar_mask"]
        )


def assert_parity(model, kind, batch=None):
    cfg = TINY[kind]
    batch = batch or make_batch(cfg)
    ref = hf_logits(hf_model(kind), batch)[..., : cfg.output_vocab_size]
    mine = ours_logits(model, batch)
    valid = batch["attention_mask"].bool()
    diff = (ref[valid] - mine[valid]).abs().max().item()
    assert diff < ATOL, f"max |logit diff| {diff:.2e} on {kind}"
    return diff


LAYOUTS = ["hub", "hub-no-head", "hub-sharded", "hf5-memory", "hf5-save"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_equal_transformers_for_every_layout(kind, layout, tmp_path):
    write_layout(kind, layout, tmp_path)
    model = load_hf_checkpoint(tmp_path)
    assert_parity(model, kind)


def test_softcaps_are_applied_and_matter(tmp_path):
    """Turning either Gemma 2 cap off must break parity: the comparison above has teeth."""
    write_layout("pg2", "hub", tmp_path)
    base = load_hf_checkpoint(tmp_path)
    batch = make_batch(TINY["pg2"])
    ref = hf_logits(hf_model("pg2"), batch)[..., : TINY["pg2"].output_vocab_size]
    valid = batch["attention_mask"].bool()
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        cfg = replace(base.config, text=replace(base.config.text, **{field: None}))
        model = load_hf_checkpoint(tmp_path, config=cfg)
        diff = (ours_logits(model, batch)[valid] - ref[valid]).abs().max().item()
        assert diff > 1e-2, f"disabling {field} changed nothing ({diff:.1e}); test weights too small"


def test_unpadded_single_example_and_multi_length(tmp_path):
    write_layout("pg1", "hub", tmp_path)
    model = load_hf_checkpoint(tmp_path)
    cfg = TINY["pg1"]
    assert_parity(model, "pg1", make_batch(cfg, seed=5, pad=(0,), suffix_len=1))
    assert_parity(model, "pg1", make_batch(cfg, seed=6, pad=(2, 0, 5), prefix_len=8, suffix_len=5))


def test_npz_big_vision_layout_gives_same_logits(kind, tmp_path):
    write_layout(kind, "hub", tmp_path / "hf")
    model = load_hf_checkpoint(tmp_path / "hf")
    arrays = state_dict_to_npz(model.state_dict(), model.config)
    # real naming and stacked shapes
    L, N, W, D = 2 if kind == "pg1" else 3, 4, 64, 16
    K = model.config.text.num_key_value_heads
    assert arrays["params/llm/layers/attn/q_einsum/w"].shape == (L, N, W, D)
    assert arrays["params/llm/layers/attn/kv_einsum/w"].shape == (L, 2, K, W, D)
    assert arrays["params/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape == (2, 32, 4, 8)
    assert arrays["params/img/embedding/kernel"].shape == (14, 14, 3, 32)
    np.savez(tmp_path / "ckpt.npz", **arrays)
    loaded = load_npz_checkpoint(tmp_path / "ckpt.npz", config=model.config)
    assert_parity(loaded, kind)


def test_npz_inferred_config_unrolled_layout_and_bf16(tmp_path):
    write_layout("pg2", "hub", tmp_path / "hf")
    model = load_hf_checkpoint(tmp_path / "hf")
    arrays = state_dict_to_npz(model.state_dict(), model.config)
    # unroll the ViT layers (big_vision's scan=False naming) and store bf16 as raw 2-byte values
    unrolled = {}
    for k, a in arrays.items():
        if "/encoderblock/" in k:
            for i in range(a.shape[0]):
                unrolled[k.replace("/encoderblock/", f"/encoderblock_{i}/")] = a[i]
        else:
            unrolled[k] = a
    bf16 = {k: torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view("V2") for k, a in unrolled.items()}
    np.savez(tmp_path / "bf16.npz", **bf16)
    loaded = load_npz_checkpoint(tmp_path / "bf16.npz")
    cfg = loaded.config
    assert (cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.post_norms) == (3, 2, True)
    assert (cfg.vision.image_size, cfg.vision.num_hidden_layers, cfg.vision.intermediate_size) == (28, 2, 64)
    assert loaded.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    expected = npz_to_state_dict({k.removeprefix("params/"): a for k, a in unrolled.items()}, cfg)
    for k, t in loaded.state_dict().items():
        torch.testing.assert_close(t.float(), expected[k].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_npz_is_read_without_pickle(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable"):
        load_npz_checkpoint(tmp_path / "evil.npz")


def test_export_reload_is_identity_and_transformers_reads_it(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    write_layout("pg2", "hf5-memory", tmp_path / "src")
    model = load_hf_checkpoint(tmp_path / "src")
    save_hub_checkpoint(model, tmp_path / "out", max_shard_bytes=200_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = load_hf_checkpoint(tmp_path / "out")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    keys = set(read_safetensors(tmp_path / "out"))
    assert keys == set(a)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    batch = make_batch(TINY["pg2"])
    diff = (hf_logits(hf, batch) - hf_logits(hf_model("pg2"), batch)).abs().max().item()
    assert diff == 0.0


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    write_layout("pg1", "hub-no-head", tmp_path)
    sd = read_safetensors(tmp_path)
    from palikit.weights.hf import load_state_dict_into
    from palikit.model import build_model

    cfg = TINY["pg1"]
    bad = dict(sd)
    bad.pop("language_model.layers.1.mlp.up_proj.weight")
    bad["language_model.layers.7.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_into(build_model(cfg), bad, "ckpt")
    msg = str(e.value)
    assert "missing tensor language_model.layers.1.mlp.up_proj.weight (expected shape (128, 64))" in msg
    assert "unexpected tensor language_model.layers.7.extra.weight" in msg
    wrong = cfg.with_image_size(42)  # 9 patches, not 4
    with pytest.raises(CheckpointError, match=r"position_embedding.weight: expected shape \(9, 32\), found \(4, 32\)"):
        load_state_dict_into(build_model(wrong), dict(sd), "ckpt")


def test_untied_head_is_refused(tmp_path):
    write_layout("pg1", "hub", tmp_path)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "model.safetensors")
    sd["language_model.lm_head.weight"] = sd["language_model.lm_head.weight"] + 1
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="differs from the embedding"):
        load_hf_checkpoint(tmp_path)


def test_multi_frame_input_equals_transformers_multi_image(tmp_path):
    """Frames encoded separately, tokens concatenated (big_vision video / NLVR2) == transformers
    with several images per prompt."""
    write_layout("pg2", "hub", tmp_path)
    model = load_hf_checkpoint(tmp_path)
    cfg = model.config
    N, S = cfg.vision.num_image_tokens, cfg.vision.image_size
    g = torch.Generator().manual_seed(4)
    frames = torch.rand(2, 3, 3, S, S, generator=g) * 2 - 1  # [B, F, 3, S, S]
    text = torch.randint(3, 300, (2, 7), generator=g)
    text[:, 0] = cfg.bos_token_id
    ids = torch.cat([torch.full((2, 3 * N), cfg.image_token_index), text], 1)
    ar = torch.zeros_like(ids)
    ar[:, -3:] = 1
    with torch.no_grad():
        ref = hf_model("pg2")(input_ids=ids, pixel_values=frames.flatten(0, 1), attention_mask=torch.ones_like(ids),
                              token_type_ids=ar, position_ids=torch.arange(1, ids.shape[1] + 1)[None].expand(2, -1)).logits
        mine = model(ids, frames, ar_mask=ar)
    assert (ref[..., : cfg.output_vocab_size] - mine).abs().max().item() < ATOL
    with pytest.raises(ValueError, match="placeholders"):
        model(ids[:, N:], frames, ar_mask=ar[:, N:])
