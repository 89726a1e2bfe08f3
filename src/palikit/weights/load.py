"""The one checkpoint loader: resolved files (`resolve.resolve`: a Hub-layout folder, a big_vision
`.npz`, a Hub id, or the bundled demo model) -> a `PaliGemmaModel`, with the checkpoint's conventions
and an optional LoRA adapter merged in. `PaliGemma.from_pretrained` (the CLI, eval baselines, the
benchmarks) and training load through it.

Verified on load, every failure a `CheckpointError` naming the file: a config.json that is not a
PaliGemma config (not an object, a section or size of the wrong type), a safetensors file that is
truncated or corrupt (its header), and weights holding NaN / inf (corrupted bytes, or a diverged
fine-tune): one pass of `isfinite` over the tensors (~1 GB/s on a CPU core)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..model import PaliGemmaModel
from .resolve import ModelFiles


def load_checkpoint(files: ModelFiles, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    final_logit_softcap: Any = "auto", sliding_window: Any = "auto",
                    adapter: str | os.PathLike | None = None) -> PaliGemmaModel:
    """The model of `files` on `device` (`dtype`: None keeps the stored one). `final_logit_softcap` /
    `sliding_window`: "auto" (the checkpoint's convention, `weights/conventions.py`), a number, or
    None. `adapter`: a PEFT LoRA folder, merged into the weights (`weights/adapter.py`)."""
    if files.format == "npz":
        from .big_vision import load_npz_checkpoint

        net = load_npz_checkpoint(files.weights, device=device, dtype=dtype, final_logit_softcap=final_logit_softcap,
                                  sliding_window=sliding_window)
    else:
        from safetensors import SafetensorError

        from .hf import CheckpointError, load_hf_checkpoint

        check_config(files.weights)
        try:
            net = load_hf_checkpoint(files.weights, device=device, dtype=dtype,
                                     final_logit_softcap=final_logit_softcap, sliding_window=sliding_window)
        except SafetensorError as e:
            raise CheckpointError(f"{files.weights}: a safetensors file is truncated or corrupt ({e}); copy or "
                                  "download the checkpoint again") from None
    check_finite(net, files.weights)
    if adapter is not None:
        from .adapter import merge_adapter

        merge_adapter(net, adapter)
    return net


def check_config(folder) -> None:
    """`CheckpointError` when `folder/config.json` cannot describe a PaliGemma model (it parses, but is
    not an object, has a section that is not an object, or a size that is not a number)."""
    from ..config import PaliGemmaConfig, read_config_json
    from .hf import CheckpointError

    d, path = read_config_json(folder)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object (the config saved with the weights), got "
                              f"{type(d).__name__}")
    for section in ("text_config", "vision_config"):
        sub = d.get(section)
        if sub is not None and not isinstance(sub, dict):
            raise CheckpointError(f"{path}: {section} must be an object, got {type(sub).__name__}")
        bad = [k for k, v in (sub or {}).items()
               if k.endswith(("_size", "_layers", "_heads", "_dim")) and not (isinstance(v, int) and v > 0)
               and v is not None]
        if bad:
            raise CheckpointError(f"{path}: {section}.{bad[0]} must be a positive whole number, got {sub[bad[0]]!r}")
    try:
        PaliGemmaConfig.from_hf_dict(d, name=path.parent.name)
    except (TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a PaliGemma config.json ({type(e).__name__}: {e})") from None


def check_finite(net: torch.nn.Module, source) -> None:
    """`CheckpointError` naming the tensors that hold NaN / inf."""
    from .hf import CheckpointError

    bad = [n for n, t in net.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): the file is corrupt or the model it was saved from "
                              "had diverged")
