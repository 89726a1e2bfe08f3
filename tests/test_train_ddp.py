"""Two-process DDP (gloo on CPU, spawned here) and gradient accumulation give the same training
as one process with the whole batch."""

from __future__ import annotations

import pytest
import os
import socket

import torch
from safetensors.torch import load_file

from palikit.train.config import TrainConfig
from palikit.train.trainer import train
from test_train_helpers import run_config, run_kwargs, setup_run, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dicts):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")  # one group for several runs (train() reuses an existing one)
    try:
        for d in cfg_dicts:
            train(TrainConfig(**d), **run_kwargs())
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    setup_run(tmp_path)
    # SGD: the update is linear in the gradient, so the comparison measures the gradients. (With
    # Adam, g / sqrt(v) turns float rounding in gradients that are exactly zero in theory -- e.g.
    # the ViT key biases, to which softmax is invariant -- into +-lr steps: ~1e-4 apart.)
    losses = ("big_vision", "hf")
    over = {loss: dict(max_steps=3, loss=loss, plot=False, lr=1e-2, optimizer="sgd") for loss in losses}
    mp.spawn(_ddp_worker, args=(2, _free_port(), [run_config(tmp_path, f"ddp-{k}", **over[k]).to_dict() for k in losses]),
             nprocs=2, join=True)
    for loss in losses:
        single = train(run_config(tmp_path, f"single-{loss}", **over[loss]), **run_kwargs())
        accum = train(run_config(tmp_path, f"accum-{loss}", grad_accum=2, **over[loss]), **run_kwargs())
        a = load_file(single / "model.safetensors")
        base = load_file(tmp_path / "base" / "model.safetensors")
        assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3
        for other in (tmp_path / f"ddp-{loss}" / "final", accum):
            b = load_file(other / "model.safetensors")
            diff = max((a[k] - b[k]).abs().max().item() for k in a)
            assert diff < 1e-6, (loss, other, diff)
