"""The three graphs transformers.js runs for PaliGemma, as torch modules over a loaded
`PaliGemmaModel`'s own weights and building blocks (nothing is copied or re-implemented numerically):

- `VisionEncoder`: pixel_values [B, 3, S, S] -> image_features [B, N, H], SigLIP + projector. Image
  features enter the decoder unscaled (palikit's convention), so the graph output is used as is.
- `EmbedTokens`: input_ids [B, T] -> inputs_embeds [B, T, H] = E[ids] * sqrt(H) (rounded to the weight
  dtype, as Gemma does). The `<image>` placeholder id embeds as id 0: transformers.js overwrites those
  rows with the image features, and a checkpoint whose embedding has no row for it still works.
- `Decoder` ("decoder_model_merged"): inputs_embeds [B, T, H], attention_mask [B, P+T] (1 = real token),
  position_ids [B, T], num_logits_to_keep (a scalar: logits for the last k positions, 0 = all) and past
  key/values [B, Hkv, P, D] per layer -> logits [B, k, V] over the predictable vocabulary (never `<image>`
  or HF's padding rows) and the present key/values [B, Hkv, P+T, D]. transformers.js passes
  num_logits_to_keep = 1 when generating, so a prefill does not compute the head at every prompt token.

The attention rule inside `Decoder` is palikit's prefix-LM rule stated in terms of what transformers.js
passes: at the first call (no past: P = 0) every valid token is prefix and sees every other valid token;
a call with a past adds tokens that see the past and each other causally. Gemma 2's sliding window
(when the config keeps one) applies to those later tokens only (the prefix block ignores it, as in
`model/gemma.py`); the attention and final-logit soft-caps are the config's (`weights/conventions.py`).
Every token may attend itself, so a padding row never becomes all-masked. Positions are whatever the
caller passes (transformers.js: 1-based counts of real tokens, the same as palikit's).

`export_ready` swaps every `nn.Linear` for a `MatMulLinear` holding the transposed weight, so each
projection exports as `MatMul(x, initializer)`: what onnxruntime's weight quantizers rewrite, and no
transposed copy of every weight is made while exporting (a 3B model would not fit twice in memory).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model import PaliGemmaModel
from ..model.layers import apply_rope, attention, rope_inv_freq, rope_tables, softcap


class MatMulLinear(nn.Module):
    """y = x @ weight_t + bias with weight_t [in, out]: an `nn.Linear` stored transposed."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight_t, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def export_ready(model: PaliGemmaModel, consume: bool = False) -> PaliGemmaModel:
    """The model with every `nn.Linear` replaced by a `MatMulLinear` (same numbers). consume=False works
    on a copy; consume=True converts `model` itself one layer at a time (memory stays at one model plus
    one weight: how a model too big to hold twice is exported; `model` is then only good for export)."""
    target = model if consume else copy.deepcopy(model)
    for parent in list(target.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                weight_t = child.weight.detach().t().contiguous()  # [in, out]
                setattr(parent, name, MatMulLinear(weight_t, child.bias))
                child.weight = None  # the [out, in] copy is freed now, not after the walk
    return target


class VisionEncoder(nn.Module):
    def __init__(self, model: PaliGemmaModel):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.multi_modal_projector = model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(self.vision_tower(pixel_values))  # [B, N, H]


class EmbedTokens(nn.Module):
    def __init__(self, model: PaliGemmaModel):
        super().__init__()
        self.language_model = model.language_model
        self.image_token_index = model.config.image_token_index

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.masked_fill(input_ids == self.image_token_index, 0)
        return self.language_model.embed(ids)  # [B, T, H]


def attention_masks(attention_mask: torch.Tensor, past_len, T: int, window: int | None):
    """bool masks [B, 1, T, P+T] (full, sliding or None): what query t (cache index P+t) may attend."""
    device = attention_mask.device
    q_index = torch.arange(T, device=device) + past_len  # [T]
    k_index = torch.arange(attention_mask.shape[1], device=device)  # [S] = [P+T]
    first_call = q_index[:1] == 0  # [1]: no past, so every valid token is prefix
    order = (k_index[None, :] <= q_index[:, None]) | first_call  # [T, S]
    valid = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
    itself = k_index[None, :] == q_index[:, None]  # [T, S]
    full = (order & valid) | itself  # [B, 1, T, S]
    if not window:
        return full, None
    in_window = (k_index[None, :] > q_index[:, None] - window) | first_call  # [T, S]
    return full, (order & in_window & valid) | itself


class Decoder(nn.Module):
    def __init__(self, model: PaliGemmaModel):
        super().__init__()
        self.language_model = model.language_model
        self.config = model.config
        cfg = model.config.text
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, "cpu"), persistent=False)
        # the tied head, transposed once ([H, V] over the predictable vocabulary): one MatMul initializer
        weight = model.language_model.embed_tokens.weight[: model.config.output_vocab_size]
        self.lm_head = MatMulLinear(weight.detach().t().contiguous(), None)

    def forward(self, inputs_embeds, attention_mask, position_ids, num_logits_to_keep, *past_key_values):
        """past_key_values: key_0, value_0, key_1, value_1, ... each [B, Hkv, P, D].
        Returns (logits [B, k, V], present key_0, value_0, ...)."""
        cfg = self.config.text
        lm = self.language_model
        x = inputs_embeds
        T = x.shape[1]
        full, sliding = attention_masks(attention_mask, past_key_values[0].shape[2], T, cfg.sliding_window)
        cos, sin = rope_tables(position_ids, self.inv_freq.to(x.device), x.dtype)  # [B, 1, T, D] each
        presents = []
        for i, layer in enumerate(lm.layers):
            mask = sliding if sliding is not None and cfg.is_sliding(i) else full
            h, k, v = self._attend(layer.self_attn, layer.input_layernorm(x), cos, sin, mask,
                                   past_key_values[2 * i], past_key_values[2 * i + 1])
            presents += [k, v]
            if layer.post_norms:
                x = x + layer.post_attention_layernorm(h)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            else:
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        start = torch.where(num_logits_to_keep > 0, T - num_logits_to_keep, 0)
        x = x[:, torch.arange(T, device=x.device) >= start]  # [B, k, H]: the last k positions (0: all)
        logits = softcap(self.lm_head(lm.norm(x)), cfg.final_logit_softcapping)  # [B, k, V]
        return (logits, *presents)

    @staticmethod
    def _attend(attn, x, cos, sin, mask, past_k, past_v):
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = attn.k_proj(x).view(B, T, attn.n_kv, attn.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = attn.v_proj(x).view(B, T, attn.n_kv, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)  # [B, Hkv, P+T, D]
        v = torch.cat([past_v, v], dim=2)
        out = attention(q, k, v, mask, attn.scale, attn.logit_cap)  # [B, Hq, T, D]
        return attn.o_proj(out.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim)), k, v
