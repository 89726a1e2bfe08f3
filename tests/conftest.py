"""Shared fixtures: tiny random PaliGemma 1 / 2 models built in transformers (the parity reference,
eager attention so Gemma 2's soft-caps are applied) and written to disk in the real formats."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from palikit.config import PRESETS, PaliGemmaConfig

TINY = {
    "pg1": PRESETS["tiny-pg1"],
    "pg2": PRESETS["tiny-pg2"],
    # sliding window shorter than the prompt: exercises "prefix ignores the window"
    "pg2-sliding": replace(
        PRESETS["tiny-pg2"],
        text=replace(PRESETS["tiny-pg2"].text, sliding_window=6),
        name="tiny-pg2-sliding",
    ),
}


@functools.lru_cache(maxsize=None)
def hf_model(kind: str, seed: int = 0):
    """transformers PaliGemma with random weights (norms included, so (1+w) is exercised)."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    cfg = TINY[kind]
    hcfg = HFConfig(**cfg.to_hf_dict())
    hcfg._attn_implementation = "eager"
    hcfg.text_config._attn_implementation = "eager"
    hcfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(hcfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.1)
    return model


def make_batch(cfg: PaliGemmaConfig, seed: int = 1, prefix_len: int = 6, suffix_len: int = 4, pad=(0, 3)):
    """A left-padded prefix+suffix batch in transformers' layout: [pad][image][text]."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(pad), cfg.vision.num_image_tokens
    T = max(pad) + N + prefix_len + suffix_len
    ids = torch.zeros(B, T, dtype=torch.long)
    ar = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(pad):
        text = torch.randint(3, cfg.output_vocab_size - 1, (T - p - N,), generator=g)
        ids[b, p:p + N] = cfg.image_token_index
        ids[b, p + N:] = text
        ids[b, p + N] = cfg.bos_token_id
        ar[b, T - suffix_len:] = 1
        valid[b, p:] = 1
    pixel_values = torch.rand(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1
    return dict(input_ids=ids, ar_mask=ar, attention_mask=valid, pixel_values=pixel_values)


def hf_logits(model, batch) -> torch.Tensor:
    positions = torch.cumsum(batch["attention_mask"], 1)  # 1-based over real tokens, as generate() does
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["ar_mask"],
            position_ids=positions,
        ).logits


@pytest.fixture(params=list(TINY))
def kind(request) -> str:
    return request.param


def script_module(name: str):
    """scripts/NAME.py imported as a module (the scripts folder is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
