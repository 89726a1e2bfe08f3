"""Building blocks shared by the towers: the decoder's Linear (`linear`: a few-row fp32 path on AMD
CPUs), Gemma RMSNorm, rotary embeddings, soft-capping, the GeGLU MLP and the attention kernel (SDPA
where it is exact, the explicit math path where Gemma 2's attention soft-cap has to be applied
between the scores and the softmax).

Numerics follow transformers' eager path, which is what parity is measured against:
RMSNorm computed in fp32 including `(1 + w)`, RoPE tables in fp32 cast to the activation dtype,
softmax in fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 32  # up to this many rows (decode steps, last-token logits) `linear` may take the W @ x.T path
FEW_ROWS_MIN_WEIGHT = 2**20  # ... for weights of at least this many elements (smaller ones lose: 0.5-0.9x)


@functools.cache
def _few_rows_transposed() -> bool:
    from ..runtime import cpu_vendor

    return cpu_vendor() == "AuthenticAMD"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except in fp32 on an AMD CPU with 2..FEW_ROWS rows and a weight of at least
    FEW_ROWS_MIN_WEIGHT elements, where it computes (W @ x.T).T: torch's MKL takes 1.3-2.3x as long
    for x @ W.T at a few rows there (an AMD EPYC, Zen 4: the 257k x 2304 head at 4 rows 405 ms
    against 193; a 9216 x 2304 weight 14.7 ms against 8.6; `python -m lab.probes.few_row_linear`);
    one row and many rows are as fast either way, and small weights (the demo model's) are faster
    through F.linear. Not measured on other vendors, so left alone there. The output is contiguous,
    as F.linear's."""
    # (compiling, exporting and tracing first: no guard on a symbolic row count, and an exported graph
    # keeps the weight as MatMul's second input, where onnxruntime's weight quantizers look for it)
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or x.device.type != "cpu"
            or x.dtype != torch.float32 or weight.numel() < FEW_ROWS_MIN_WEIGHT or not _few_rows_transposed()):
        return F.linear(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if 1 < rows <= FEW_ROWS:
        out = torch.mm(weight, x.reshape(rows, -1).T).T  # [rows, out] (a transposed view)
        if bias is not None:
            out = out + bias
        return out.contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and state_dict) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)`, weights stored as offsets from 1."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # fused x * rsqrt(mean(x^2) + eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    if not cap:
        return x
    return torch.tanh(x / cap) * cap


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin for integer `positions` [B, T] -> two tensors [B, 1, T, head_dim] in `dtype`."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-halves rotation (HF `rotate_half`, big_vision's layout). x: [B, H, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GeGLU(nn.Module):
    """Gemma MLP: down(gelu_tanh(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.gate_proj = Linear(dim, hidden, bias=False, **dd)
        self.up_proj = Linear(dim, hidden, bias=False, **dd)
        self.down_proj = Linear(hidden, dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    logit_cap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention. q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, 1, T, S] (True =
    may attend) or None for full attention. Returns [B, Hq, T, D].

    Without a soft-cap this is SDPA (flash / memory-efficient kernels on GPU). With one, the scores
    must be capped before the softmax, which SDPA cannot express, so the math is written out
    (transformers' SDPA path silently skips the cap; we never do).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if not logit_cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hkv != Hq)
    G, S = Hq // Hkv, k.shape[2]
    # query heads grouped under their kv head as rows of one matrix: k / v (slices of the KV cache) are
    # read in place, never broadcast over the group (matmul would copy them G times per layer and step)
    qg = q.reshape(B, Hkv, G * T, D)
    scores = (torch.matmul(qg, k.transpose(-1, -2)) * scale).view(B, Hkv, G, T, S)
    scores = softcap(scores, logit_cap)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(B, Hkv, G * T, S), v)  # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D)
