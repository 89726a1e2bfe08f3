"""Atomic, verified, resumable training checkpoints.

A checkpoint is a folder `checkpoints/step-00000120/` holding
- `trainable.safetensors`: the trainable parameters (everything in `full` mode; the attention
  weights or the LoRA adapters otherwise -- the frozen rest comes from the base model on resume),
- `optimizer.pt`, `trainer_state.pt`: optimizer and LR-scheduler state, RNG states (python, numpy,
  torch CPU and CUDA), the step (= data position: batch order is a pure function of seed and step),
- `state.json`: step, metrics and the loss history, human-readable,
- `train_config.json`: the recipe that wrote it (a resumed run with another recipe is refused),
- `checksums.json`: the SHA-256 of every other file (1.1 GB/s here), written last.

It is written into `checkpoints/.tmp-step-.../` (every file fsynced) and then renamed into place,
which is atomic on POSIX: a crash or SIGKILL leaves either the complete folder or a `.tmp-` folder
that is ignored and cleaned up on the next start. What a rename cannot protect against (a disk that
filled up or flipped bytes, a copy cut short, a hand edit) is caught on load: `verify_checkpoint`
checks the files against their checksums, `read_trainable` the parameters for NaN / inf, and a
resumed run falls back to the newest checkpoint that passes, naming each one it skipped and why
(`resume.py`). A checkpoint is never written with non-finite parameters (`NonFiniteError`).
"""

from __future__ import annotations

import hashlib
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
FILES = ("state.json", "trainable.safetensors", "optimizer.pt", "trainer_state.pt")
CONFIG = "train_config.json"
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (missing or corrupt files, NaN / inf parameters); the
    message says which file and what is wrong."""


class NonFiniteError(ValueError):
    """Parameters hold NaN / inf: not saved, not exported."""


def nonfinite_names(params: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or inf."""
    return [n for n, t in params.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    config: dict | None = None,
) -> Path:
    """`params` / `optimizer_state` override what is read from the model / optimizer (FSDP passes
    the gathered full tensors); `config`: the recipe (`TrainConfig.to_dict()`), kept beside the state.
    Raises `NonFiniteError` (nothing written) when a parameter holds NaN / inf."""
    from safetensors.torch import save as st_save

    if params is None:
        params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    params = {n: t.contiguous() for n, t in params.items()}
    bad = nonfinite_names(params)
    if bad:
        raise NonFiniteError(f"not saving step {step}: {len(bad)} parameter tensor(s) hold NaN or inf "
                             f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state()}
    files = {"trainable.safetensors": lambda: st_save(params, metadata={"format": "pt"}),
             "optimizer.pt": lambda: _torch_bytes(optimizer_state),
             "trainer_state.pt": lambda: _torch_bytes(trainer_state),
             "state.json": lambda: (json.dumps({"step": step, **info}, indent=1) + "\n").encode()}
    if config is not None:
        files[CONFIG] = lambda: (json.dumps(config, indent=1) + "\n").encode()

    def fill(tmp: Path):
        sums = {}
        for name, make in files.items():
            data = make()
            (tmp / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")

    return atomic_dir(Path(output_dir) / CKPT_DIR / f"{PREFIX}{step:08d}", fill)


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoints/step-N` folder (complete or not), oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints with every file present, oldest first (`verify_checkpoint` says whether they are intact)."""
    return [p for p in step_folders(output_dir) if all((p / f).exists() for f in FILES)]


def verify_checkpoint(path: str | Path) -> None:
    """Raise `CheckpointError` saying what is wrong with the checkpoint folder `path`: a missing file, a
    file whose SHA-256 differs from `checksums.json`, an unreadable `state.json` or safetensors header.
    Checkpoints written before checksums existed are checked for readable headers only."""
    from safetensors import safe_open

    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path.name}: missing {', '.join(missing)}")
    if (path / CHECKSUMS).is_file():
        try:
            sums = json.loads((path / CHECKSUMS).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: {CHECKSUMS} is unreadable ({e})") from None
        for name, want in sums.items():
            if not (path / name).is_file():
                raise CheckpointError(f"{path.name}: missing {name}")
            if sha256_file(path / name) != want:
                size = (path / name).stat().st_size
                raise CheckpointError(f"{path.name}: {name} does not match its checksum ({size:,} bytes now): "
                                      "truncated or corrupted after it was written")
    try:
        json.loads((path / "state.json").read_text())
        with safe_open(str(path / "trainable.safetensors"), "pt"):
            pass
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CheckpointError(f"{path.name}: unreadable ({type(e).__name__}: {e})") from None


def saved_config(path: str | Path) -> dict | None:
    """The recipe a checkpoint was written with (None: written before checkpoints kept it)."""
    f = Path(path) / CONFIG
    return json.loads(f.read_text()) if f.is_file() else None


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


def read_trainable(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable parameters; unreadable or non-finite ones raise `CheckpointError`."""
    from safetensors.torch import load_file

    try:
        params = load_file(path / "trainable.safetensors")
    except Exception as e:  # noqa: BLE001 - a truncated / corrupt file: say which, never a raw SafetensorError
        raise CheckpointError(f"{path.name}: trainable.safetensors is unreadable ({type(e).__name__}: {e})") from None
    bad = nonfinite_names(params)
    if bad:
        raise CheckpointError(f"{path.name}: {len(bad)} parameter tensor(s) hold NaN or inf ({', '.join(bad[:3])})")
    return params


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Load trainable params (strict over the trainable set, finite), optimizer, scheduler, RNG; return
    state.json. Unreadable or non-finite parameters raise `CheckpointError` before anything is copied."""
    path = Path(path)
    params = read_trainable(path)
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
