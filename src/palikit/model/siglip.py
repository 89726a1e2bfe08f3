"""SigLIP ViT image encoder as PaliGemma uses it: 14x14 patch conv, learned position embedding,
pre-LN transformer blocks (LayerNorm eps 1e-6, GELU-tanh MLP), final LayerNorm, no pooling head.
Module names follow transformers' SigLIP so Hub weights map one-to-one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, **dd)
        self.position_embedding = nn.Embedding(cfg.num_image_tokens, cfg.hidden_size, **dd)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, N, C], row-major patch order
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        C = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(C, C, **dd)
        self.k_proj = nn.Linear(C, C, **dd)
        self.v_proj = nn.Linear(C, C, **dd)
        self.out_proj = nn.Linear(C, C, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        shape = (B, N, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, N, D]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **dd)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **dd)
        self.self_attn = SiglipAttention(cfg, **dd)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **dd)
        self.mlp = SiglipMLP(cfg, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTower(nn.Module):
    """pixel_values [B, 3, S, S] in [-1, 1] -> patch features [B, (S/14)^2, 1152]."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg
        self.embeddings = SiglipEmbeddings(cfg, device, dtype)
        self.encoder = SiglipEncoder(cfg, device, dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        S = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, S, S):
            raise ValueError(
                f"pixel_values must be [B, {self.config.num_channels}, {S}, {S}] for this model, got "
                f"{tuple(pixel_values.shape)}; preprocess images with the model's ImageProcessor."
            )
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
