"""Two-process DDP (gloo on CPU, spawned here) and gradient accumulation give the same training
as one process with the whole batch."""

from __future__ import annotations

import pytest

from safetensors.torch import load_file

from palikit.train.config import TrainConfig
from palikit.train.trainer import train
from helpers import free_port
from helpers.train import distributed_worker, run_config, run_kwargs, setup_run

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


def test_ddp_with_frozen_params_accumulation_eval_and_resume(tmp_path):
    """LoRA / attention modes (most parameters frozen) under DDP with grad_accum=2 (no_sync on the first
    micro-batch): equal to one process; evaluation (val loss + task metric on rank 0's bare model) runs
    in the loop; a DDP run stopped at step 2 of 2 and resumed to step 3 ends where one process doing
    the same does (warmup=0: the cosine schedule depends on max_steps, so resuming differs from a fresh run)."""
    import json

    import torch.multiprocessing as mp

    setup_run(tmp_path)
    val = str(tmp_path / "data" / "train.jsonl")
    over = {mode: dict(max_steps=3, mode=mode, grad_accum=2, plot=False, lr=5e-2, warmup=0, optimizer="sgd",
                       val_data=val, task_metric_samples=2, eval_every=2) for mode in ("lora", "attention")}

    def resumed(prefix):
        half = run_config(tmp_path, f"{prefix}-resume", **dict(over["lora"], max_steps=2)).to_dict()
        return [half, dict(half, max_steps=3, resume="force")]  # a longer run: a changed recipe

    runs = [run_config(tmp_path, f"ddp-{m}", **over[m]).to_dict() for m in over] + resumed("ddp")
    mp.spawn(distributed_worker, args=(2, free_port(), runs), nprocs=2, join=True)
    for d in resumed("single"):
        train(TrainConfig(**dict(d, grad_accum=1)), **run_kwargs())
    base = load_file(tmp_path / "base" / "model.safetensors")

    def diff(x, y) -> float:
        a, b = load_file(tmp_path / x / "final" / "model.safetensors"), load_file(tmp_path / y / "final" / "model.safetensors")
        assert a.keys() == b.keys()
        return max((a[k] - b[k]).abs().max().item() for k in a)

    for mode in over:
        single = train(run_config(tmp_path, f"single-{mode}", **dict(over[mode], grad_accum=1)), **run_kwargs())
        a = load_file(single / "model.safetensors")
        assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4, mode
        assert diff(f"single-{mode}", f"ddp-{mode}") < 1e-6, mode
    assert diff("single-resume", "ddp-resume") < 1e-6
    assert diff("ddp-lora", "ddp-resume") > 1e-5  # the resumed run did continue from step 2
    best = json.loads((tmp_path / "ddp-lora" / "best.json").read_text())
    assert best["metric"] == "val_loss" and best["step"] in (2, 3)
