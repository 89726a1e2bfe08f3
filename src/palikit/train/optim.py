"""The optimizer and its schedule: AdamW (b1, b2, eps 1e-8, decoupled weight decay on every weight or,
`weight_decay_on=kernels`, on Linear/Conv kernels only, as big_vision) or plain SGD (the colab's
attention-only recipe), with a linear warmup from 0 then cosine decay to 0 (big_vision's
`decay_type="cosine"`); and the seeds of a run."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch


def cosine_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for optimizer step `s` (0-based): linear warmup to 1, cosine decay to 0."""

    def f(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def param_groups(model: torch.nn.Module, trainable: list[torch.nn.Parameter], weight_decay: float,
                 on: str = "all") -> list[dict]:
    """Optimizer groups of `trainable` (parameters of `model`). `on="all"`: one group, decay everywhere.
    `on="kernels"` (big_vision's rule): decay only the weights of Linear / Conv layers (LoRA's included);
    norms, biases, embeddings and position embeddings get none."""
    if on == "all" or weight_decay == 0:
        return [{"params": trainable}]
    kernels = {id(m.weight) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and getattr(m, "weight", None) is not None}
    decay = [p for p in trainable if id(p) in kernels]
    rest = [p for p in trainable if id(p) not in kernels]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg, model: torch.nn.Module, params: list[torch.nn.Parameter], total_steps: int,
                    warmup_steps: int):
    """(optimizer, LR scheduler) of a `TrainConfig` over `params` (the trainable parameters of `model`)."""
    groups = param_groups(model, params, cfg.weight_decay, cfg.weight_decay_on)
    if cfg.optimizer_name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                      weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_steps, warmup_steps))
