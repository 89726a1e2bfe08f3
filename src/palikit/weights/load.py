"""The one checkpoint loader: resolved files (`resolve.resolve`: a Hub-layout folder, a big_vision
`.npz`, a Hub id, or the bundled demo model) -> a `PaliGemmaModel`, with the checkpoint's conventions
and an optional LoRA adapter merged in. `PaliGemma.from_pretrained` (the CLI, eval baselines, the
benchmarks) and training load through it."""

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
        from .hf import load_hf_checkpoint

        net = load_hf_checkpoint(files.weights, device=device, dtype=dtype, final_logit_softcap=final_logit_softcap,
                                 sliding_window=sliding_window)
    if adapter is not None:
        from .adapter import merge_adapter

        merge_adapter(net, adapter)
    return net
