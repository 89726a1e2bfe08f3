"""Gemma 1 and Gemma 2 decoders in one class, driven by config flags (GQA/MQA, RoPE, RMSNorm(1+w),
GeGLU-tanh, attention and final-logit soft-caps, post-norms, query pre-attention scale, sliding
window), plus the static KV cache and the prefix-LM mask rule.

Attention rule (big_vision's `make_attn_mask`): every token carries a *block* number, the cumsum
of its autoregressive flag (0 for image + BOS + prefix + "\\n", then 1, 2, ... for suffix tokens);
padding carries `PAD_BLOCK`. Query i may attend key j iff block[j] <= block[i]. That makes the
prefix one bidirectional block and the suffix causal. Each token may always attend itself, so a
padding row never becomes fully masked (no NaN leaks into later layers).

Module names follow transformers' Gemma so Hub weights map one-to-one. Note the HF naming quirk
kept here: in Gemma 1, `post_attention_layernorm` is the norm *before* the MLP.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..config import TextConfig
from .layers import GeGLU, Linear, RMSNorm, apply_rope, attention, rope_inv_freq, rope_tables

PAD_BLOCK = 2**30  # block number of padding / unwritten cache slots: never attended


class KVCache(nn.Module):
    """Static cache allocated once: k/v [L, B, Hkv, T_max, D] and the block number of every slot.
    Each row is one sequence (a slot of the continuous-batching engine). Writes go to device-side
    (row, slot) indices, so shapes never change and the decode step can be captured in a CUDA graph."""

    def __init__(self, cfg: TextConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer(
            "block", torch.full((batch_size, max_len), PAD_BLOCK, device=device, dtype=torch.int32), persistent=False
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Mark every slot (of `rows` only, when given) unwritten: never attended again."""
        if rows is None:
            self.block.fill_(PAD_BLOCK)
        else:
            self.block.index_fill_(0, rows, PAD_BLOCK)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Reorder / duplicate batch rows in place (beam search, prefix sharing)."""
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))
        self.block.copy_(self.block.index_select(0, rows))


class CacheWrite(NamedTuple):
    """Where a call stores its keys/values: token t of batch row b goes to cache row `rows[b, t]`,
    slot `slots[b, t]` (both [B, T] long). `read_len` None: attention runs over the call's own
    tokens (prefill); an int: over cache slots [0, read_len) of cache rows [0, B), after the write
    (decode: batch row b is cache row b, and B may be fewer than the cache's rows)."""

    cache: KVCache
    rows: torch.Tensor
    slots: torch.Tensor
    read_len: int | None = None


def positions_and_blocks(valid: torch.Tensor, ar_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions (1-based over real tokens, as transformers) and attention block numbers [B, T]
    from the validity mask [B, T] (bool) and the autoregressive flags (None = all prefix)."""
    positions = torch.cumsum(valid.long(), dim=1)
    ar = torch.zeros(valid.shape, dtype=torch.int32, device=valid.device) if ar_mask is None else ar_mask.to(torch.int32)
    block = torch.where(valid, torch.cumsum(ar, dim=1, dtype=torch.int32), PAD_BLOCK)
    return positions, block


def build_mask(q_block, k_block, q_index, k_index, window: int | None) -> torch.Tensor:
    """bool [B, 1, T, S]: q_block [B, T], k_block [B, S], q_index [T] or [B, T] (cache slot of each
    query, per row when rows decode at different slots), k_index [S]."""
    allowed = k_block[:, None, :] <= q_block[:, :, None]  # [B, T, S]
    if window:
        in_window = k_index > q_index[..., None] - window  # [T, S] or [B, T, S]
        allowed = allowed & (in_window | (q_block == 0)[:, :, None])  # the prefix block ignores the window
    allowed = allowed | (k_index == q_index[..., None])  # every token may attend itself
    return allowed[:, None]


class GemmaAttention(nn.Module):
    def __init__(self, cfg: TextConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False, **dd)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False, **dd)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False, **dd)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False, **dd)
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.logit_cap = cfg.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, layer_cache=None, write: CacheWrite | None = None):
        """layer_cache: this layer's (k, v) cache tensors [B_cache, Hkv, T_max, D]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, Hq, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache  # [B_cache, Hkv, T_max, D]
            heads = torch.arange(self.n_kv, device=x.device)[None, :, None]  # [1, Hkv, 1]
            index = (write.rows[:, None, :], heads, write.slots[:, None, :])  # -> [B, Hkv, T]
            cache_k.index_put_(index, k.to(cache_k.dtype))
            cache_v.index_put_(index, v.to(cache_v.dtype))
            if write.read_len is not None:
                k, v = cache_k[:B, :, : write.read_len], cache_v[:B, :, : write.read_len]  # [B, Hkv, S, D]
        out = attention(q, k, v, mask, self.scale, self.logit_cap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.post_norms = cfg.post_norms
        self.self_attn = GemmaAttention(cfg, **dd)
        self.mlp = GeGLU(H, cfg.intermediate_size, **dd)
        self.input_layernorm = RMSNorm(H, eps, **dd)
        self.post_attention_layernorm = RMSNorm(H, eps, **dd)  # Gemma 1: the pre-MLP norm (HF naming)
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(H, eps, **dd)
            self.post_feedforward_layernorm = RMSNorm(H, eps, **dd)

    def forward(self, x, cos, sin, mask, layer_cache=None, write: CacheWrite | None = None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, write)
        if not self.post_norms:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self._inv_freq: torch.Tensor | None = None  # computed on first use (the model may be built on meta)

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, device)
        return self._inv_freq

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids] * sqrt(hidden), the factor rounded to the weight dtype as Gemma does."""
        x = self.embed_tokens(ids)  # nn.Embedding or the int8 `model.quant.Int8Embedding`
        return x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype, device=x.device)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H] input embeddings
        positions: torch.Tensor,  # [B, T] RoPE positions
        block: torch.Tensor,  # [B, T] attention block numbers (see module docstring)
        write: CacheWrite | None = None,  # where this call's k/v go, and what attention reads
    ) -> torch.Tensor:
        cfg = self.config
        T = x.shape[1]
        if write is None or write.read_len is None:
            q_index = k_index = torch.arange(T, device=x.device)
            k_block = block
        else:
            q_index, k_index = write.slots, torch.arange(write.read_len, device=x.device)  # [B, T], [S]
        if write is not None:
            write.cache.block.index_put_((write.rows, write.slots), block.to(torch.int32))
            if write.read_len is not None:
                k_block = write.cache.block[: x.shape[0], : write.read_len]  # [B, S]
        mask_full = build_mask(block, k_block, q_index, k_index, None)
        mask_sliding = build_mask(block, k_block, q_index, k_index, cfg.sliding_window) if cfg.sliding_window else None
        cos, sin = rope_tables(positions, self.inv_freq(x.device), x.dtype)
        for i, layer in enumerate(self.layers):
            mask = mask_sliding if mask_sliding is not None and cfg.is_sliding(i) else mask_full
            layer_cache = None if write is None else (write.cache.k[i], write.cache.v[i])
            x = layer(x, cos, sin, mask, layer_cache, write)
        return self.norm(x)
