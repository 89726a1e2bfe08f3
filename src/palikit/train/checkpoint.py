"""Atomic, resumable training checkpoints and the final export.

A checkpoint is a folder `checkpoints/step-00000120/` holding
- `trainable.safetensors`: the trainable parameters (everything in `full` mode; the attention
  weights or the LoRA adapters otherwise -- the frozen rest comes from the base model on resume),
- `optimizer.pt`, `trainer_state.pt`: optimizer and LR-scheduler state, RNG states (python, numpy,
  torch CPU and CUDA), the step (= data position: batch order is a pure function of seed and step),
- `state.json`: step, metrics and the loss history, human-readable.

It is written into `checkpoints/.tmp-step-.../` (every file fsynced) and then renamed into place,
which is atomic on POSIX: a crash or SIGKILL leaves either the complete folder or a `.tmp-` folder
that is ignored and cleaned up on the next start. So "the latest `step-*` folder" is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_dir

CKPT_DIR = "checkpoints"
PREFIX = "step-"


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    info: dict,
    *,
    params: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """`params` / `optimizer_state` override what is read from the model / optimizer (FSDP passes
    the gathered full tensors)."""
    from safetensors.torch import save as st_save

    if params is None:
        params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: t.contiguous() for n, t in params.items()}
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state()}

    def fill(tmp: Path):
        (tmp / "trainable.safetensors").write_bytes(st_save(params, metadata={"format": "pt"}))
        (tmp / "optimizer.pt").write_bytes(_torch_bytes(optimizer_state))
        (tmp / "trainer_state.pt").write_bytes(_torch_bytes(trainer_state))
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=1) + "\n")

    return atomic_dir(Path(output_dir) / CKPT_DIR / f"{PREFIX}{step:08d}", fill)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    files = ("state.json", "trainable.safetensors", "optimizer.pt", "trainer_state.pt")
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and all((p / f).exists() for f in files)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def clean_partial(output_dir: str | Path) -> None:
    """Remove `.tmp-` / `.old-` leftovers of an interrupted write."""
    for root in (Path(output_dir), Path(output_dir) / CKPT_DIR):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load trainable params (strict over the trainable set), optimizer, scheduler, RNG; return state.json."""
    from safetensors.torch import load_file

    path = Path(path)
    params = load_file(path / "trainable.safetensors")
    own = dict(model.named_parameters())
    missing = [n for n, p in own.items() if p.requires_grad and n not in params]
    unknown = [n for n in params if n not in own]
    if missing or unknown:
        raise ValueError(f"{path} does not match this model/mode: missing {missing[:5]}, unexpected {unknown[:5]} "
                         "(was it written with another mode or lora_targets?)")
    with torch.no_grad():
        for n, t in params.items():
            own[n].copy_(t)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return json.loads((path / "state.json").read_text())


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    found = list_checkpoints(output_dir)
    for p in found[: max(len(found) - max(keep_last, 1), 0)]:
        if p.name not in keep:
            # rename first (atomic), so a kill during the delete never leaves a half checkpoint
            # that looks complete; the `.old-` leftover is removed by `clean_partial`
            trash = p.parent / f".old-{p.name}-{os.getpid()}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
