"""Two-process DDP (gloo on CPU, spawned here) and gradient accumulation give the same training
as one process with the whole batch."""

from __future__ import annotations

import pytest

from safetensors.torch import load_file

from palikit.train.trainer import train
from test_train_helpers import distributed_worker, free_port, one_thread, run_config, run_kwargs, setup_run  # noqa: F401

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: two training processes


def test_two_process_ddp_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    setup_run(tmp_path)
    # SGD: the update is linear in the gradient, so the comparison measures the gradients. (With
    # Adam, g / sqrt(v) turns float rounding in gradients that are exactly zero in theory -- e.g.
    # the ViT key biases, to which softmax is invariant -- into +-lr steps: ~1e-4 apart.)
    losses = ("big_vision", "hf")
    over = {loss: dict(max_steps=3, loss=loss, plot=False, lr=1e-2, optimizer="sgd") for loss in losses}
    mp.spawn(distributed_worker, args=(2, free_port(), [run_config(tmp_path, f"ddp-{k}", **over[k]).to_dict() for k in losses]),
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
