"""FSDP (PyTorch FSDP2, gloo on CPU, two spawned processes): sharded training equals one process
with the whole batch; checkpoints are gathered into the ordinary format and resume sharded."""

from __future__ import annotations


import pytest
from safetensors.torch import load_file

from palikit.train.trainer import train
from helpers import free_port
from helpers.train import distributed_worker, run_config, run_kwargs, setup_run

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: two training processes


def _max_diff(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_matches_single_process_and_resumes_sharded(tmp_path):
    import torch.multiprocessing as mp

    setup_run(tmp_path)
    common = dict(loss="hf", plot=False, lr=1e-2, optimizer="sgd", momentum=0.9, val_data=str(tmp_path / "data" / "train.jsonl"))
    full4 = run_config(tmp_path, "fsdp-4", fsdp=True, max_steps=4, **common).to_dict()
    half = run_config(tmp_path, "fsdp-resume", fsdp=True, max_steps=2, **common).to_dict()
    resumed = dict(half, max_steps=4, resume="force")  # same output_dir: continues from the step-2 checkpoint
    mp.spawn(distributed_worker, args=(2, free_port(), [full4, half, resumed]), nprocs=2, join=True)
    single = train(run_config(tmp_path, "single-4", max_steps=4, **common), **run_kwargs())
    assert _max_diff(single, tmp_path / "single-4" / "final") == 0.0
    base = load_file(tmp_path / "base" / "model.safetensors")
    moved = load_file(single / "model.safetensors")
    assert max((moved[k] - base[k]).abs().max().item() for k in base) > 1e-3
    assert _max_diff(single, tmp_path / "fsdp-4" / "final") < 1e-5
    # the resumed sharded run restored params, momentum buffers and schedule from the gathered checkpoint
    assert _max_diff(tmp_path / "fsdp-4" / "final", tmp_path / "fsdp-resume" / "final") < 1e-6
