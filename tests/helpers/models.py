"""Tiny PaliGemma 1 / 2 references for the parity and engine tests: random models built in transformers
(the parity reference, eager attention so Gemma 2's soft-caps are applied), their weights written to disk
in every key layout found in the wild, transformers-layout batches and logits, and engine requests."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import torch
from safetensors.torch import save_file

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


def write_layout(kind: str, layout: str, folder) -> None:
    """Write the HF model's weights in one of the key layouts found in the wild."""
    hm = hf_model(kind)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY[kind].to_hf_dict()))
    mem = {k: v.contiguous() for k, v in hm.state_dict().items()}
    if layout == "hf5-save":
        hm.save_pretrained(folder)
        return
    if layout == "hf5-memory":
        save_file({k: v.clone() for k, v in mem.items()}, folder / "model.safetensors")
        return

    def legacy(k):
        k = k.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.vision_model.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        return "language_model.lm_head.weight" if k == "lm_head.weight" else k

    hub = {legacy(k): v.clone() for k, v in mem.items()}
    if layout == "hub-no-head":
        hub.pop("language_model.lm_head.weight")
    if layout == "hub-sharded":
        keys = sorted(hub)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for name, ks in halves.items():
            save_file({k: hub[k] for k in ks}, folder / name)
        index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return
    save_file(hub, folder / "model.safetensors")


def requests_for(model, n=3, seed=0, frames=(1, 2, 1)):
    """`n` engine requests of random text with the tower's features of random pixels (`frames` images each)."""
    from palikit.engine import Request

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    S = cfg.vision.image_size
    out = []
    for i in range(n):
        pv = torch.rand(frames[i % len(frames)], 3, S, S, generator=g) * 2 - 1
        feats = model.embed_images(pv[None])[0].detach()  # [F*N, H]
        text = [cfg.bos_token_id] + torch.randint(3, 300, (2 + 3 * i,), generator=g).tolist() + [7]
        out.append(Request(text, feats))
    return out
