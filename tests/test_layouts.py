"""The one table of checkpoint key layouts (`weights/layouts.py`): every layout maps palikit's names
there and back; the layouts transformers and palikit really write are recognised from their keys;
`hf_model_from` (palikit -> transformers through the table) gives transformers the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from helpers.models import TINY, hf_logits, hf_model, make_batch
from palikit.testing import hf_model_from, random_model
from palikit.weights.export import hub_key, save_hub_checkpoint
from palikit.weights.layouts import HEAD_KEYS, LAYOUTS, MODULES, detect_layout, internal_key, to_layout


@pytest.fixture(scope="module")
def names():
    return list(random_model(TINY["pg2"]).state_dict())


# (layout, palikit name, key in that layout)
CASES = [
    ("hub", "language_model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("hub", "vision_tower.post_layernorm.bias", "vision_tower.vision_model.post_layernorm.bias"),
    ("hub", "multi_modal_projector.linear.weight", "multi_modal_projector.linear.weight"),
    ("transformers", "language_model.norm.weight", "model.language_model.norm.weight"),
    ("transformers", "vision_tower.embeddings.patch_embedding.weight",
     "model.vision_tower.embeddings.patch_embedding.weight"),
    ("transformers", "multi_modal_projector.linear.bias", "model.multi_modal_projector.linear.bias"),
    ("transformers-4.52", "vision_tower.encoder.layers.1.mlp.fc1.weight",
     "model.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"),
    ("hf5-save", "language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("hf5-save", "vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.weight"),
]


@pytest.mark.parametrize("layout,name,key", CASES)
def test_table_cases(layout, name, key):
    assert to_layout(name, layout) == key
    assert internal_key(key) == name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_name_goes_there_and_back_and_the_layout_is_recognised(layout, names):
    keys = [to_layout(n, layout) for n in names]
    assert len(set(keys)) == len(names)
    assert [internal_key(k) for k in keys] == names
    assert detect_layout(keys) == layout
    head = LAYOUTS[layout].head
    if head is not None:
        assert head in HEAD_KEYS and detect_layout(keys + [head]) == layout


def test_palikit_names_start_with_the_three_modules(names):
    assert {n.split(".")[0] + "." for n in names} == set(MODULES)


def test_layouts_written_by_transformers_and_palikit_are_recognised(names, tmp_path):
    hf = hf_model("pg2")
    assert detect_layout(hf.state_dict()) == "transformers"  # the installed transformers' in-memory layout
    hf.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        saved = list(f.keys())
    assert detect_layout(saved) == "hf5-save"
    assert sorted(internal_key(k) for k in saved if k not in HEAD_KEYS) == sorted(names)
    save_hub_checkpoint(random_model(TINY["pg2"]), tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as f:
        exported = list(f.keys())
    assert detect_layout(exported) == "hub"
    assert sorted(exported) == sorted(hub_key(n) for n in names)


def test_unknown_or_mixed_layouts_are_refused(names):
    with pytest.raises(ValueError, match="unknown key layout 'jax'"):
        to_layout(names[0], "jax")
    mixed = [to_layout(n, "hub") for n in names[:5]] + [to_layout(n, "hf5-save") for n in names[5:]]
    with pytest.raises(ValueError, match="no known layout"):
        detect_layout(mixed)


def test_hf_model_from_gives_transformers_the_same_logits():
    cfg = TINY["pg2"]
    model = random_model(cfg, seed=3)
    with torch.no_grad():  # weights large enough that a misplaced tensor shows in the logits
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(5.0)
    batch = make_batch(cfg)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                     ar_mask=batch["ar_mask"])
    theirs = hf_logits(hf_model_from(model), batch)[..., : cfg.output_vocab_size]
    valid = batch["attention_mask"].bool()
    assert ours[valid].std() > 0.1  # not all-zero logits: the comparison has teeth
    assert (ours[valid] - theirs[valid]).abs().max().item() < 1e-4
