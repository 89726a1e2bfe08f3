"""Fully sharded data parallel (PyTorch FSDP2 `fully_shard`) for models that do not fit one GPU:
every SigLIP and Gemma layer is its own shard unit, the root holds the rest (embedding, norms,
projector); parameters, gradients and optimizer state are split over the ranks. Works with gloo on
CPU too, which is how it is tested.

Checkpoints stay in the single-process format: the trainable parameters and the optimizer state are
gathered into full tensors (a collective: every rank calls these), rank 0 writes them, and resume
loads full state into the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for layer in list(model.vision_tower.encoder.layers) + list(model.language_model.layers):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # called outside forward() by the loss (logits only at supervised positions) and the engine
    register_fsdp_forward_method(model, "logits")
    register_fsdp_forward_method(model, "embed_images")
    return model


def _opts(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters as full CPU tensors (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_opts())


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full_model_state(model).items() if k in names}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_opts())


def load_full_state(model: nn.Module, optimizer, params: dict[str, torch.Tensor], optim_state: dict | None) -> None:
    """Full (unsharded) trainable params and optimizer state into the shards (every rank has them)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, params, options=_opts(strict=False))
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_opts())


def total_grad_norm(params, max_norm: float) -> float:
    """Clip (when max_norm is finite) and return the global gradient norm across shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def load_sharded_checkpoint(path, model: nn.Module, optimizer, scheduler) -> dict:
    """Resume the sharded model from a single-process-format checkpoint folder: full trainable params
    and optimizer state into the shards, the scheduler and RNG state; returns its state.json."""
    import json

    from .checkpoint import read_trainable, set_rng_state

    params = read_trainable(path)
    own = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != own:
        raise ValueError(f"{path} does not match this model/mode (was it written with another mode or lora_targets?)")
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    load_full_state(model, optimizer, params, optim_state)
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    return json.loads((path / "state.json").read_text())
