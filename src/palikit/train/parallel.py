"""Data parallelism for training: the process group under `torchrun` (`_Dist`: nccl on GPU, gloo on
CPU) and the loss forward wrapped in torch's `DistributedDataParallel` (`data_parallel`). FSDP2
sharding lives in `fsdp.py`."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .collate import token_nll


class _Dist:
    """WORLD_SIZE / RANK / LOCAL_RANK from the environment; collectives that are no-ops in one process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False

    def init(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owned = True

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


class LossForward(torch.nn.Module):
    """The training forward -- `token_nll`: the model's forward, then `model.logits` at the supervised
    positions -- as one module, so that DistributedDataParallel sees all of it inside its forward().
    Holds the model as a submodule; checkpoints, export and eval keep using the bare model."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return token_nll(self.model, batch, self.label_smoothing)  # nll [B, T-1], weights [B, T-1]


def data_parallel(forward: LossForward, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """`forward` in DistributedDataParallel (the process group must be up). DDP reduces only the
    parameters that require grad (a mode's frozen ones are left alone) and every trainable one gets
    a gradient in every mode, so there is no unused-parameter search; buffers (RoPE tables) are the
    same on every rank, so they are not broadcast at each forward. At construction rank 0's
    parameters are broadcast, so every rank starts from the same weights."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=False)
