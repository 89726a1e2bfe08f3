"""What a training run loads before the loop: the base model (a Hub-layout folder, a big_vision
`.npz`, or `demo` / nothing = the bundled demo model, resolved as the CLI does when `--model` is
omitted), its tokenizer, and the optional metric hook."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from .config import TrainConfig

DEMO_NAMES = ("", "demo")


def resolve_model(name: str, log: Callable[[str], None] = print) -> str:
    """`model=demo` (or no model) -> the bundled demo model's folder (the CLI's own lookup); a real
    folder called `demo` wins. Other names are returned as they are."""
    if name not in DEMO_NAMES or (name and (Path(name) / "config.json").exists()):
        return name
    from ..demo.paths import bundled_demo_model

    demo = bundled_demo_model()
    if demo is None:
        raise FileNotFoundError(f"model={name or '(not set)'} means the bundled demo model, which this install "
                                "does not have; set model=PATH to a checkpoint folder or big_vision .npz")
    log(f"model=demo: the bundled demo model {demo} (tiny, trained on synthetic shapes); "
        "set model=PATH for real weights")
    return str(demo)


def load_model(path: str, device="cpu", dtype=torch.float32, final_logit_softcap="auto"):
    """The checkpoint to train; `final_logit_softcap` as in TrainConfig (None: trained uncapped)."""
    p = Path(path)
    if p.suffix == ".npz":
        from ..weights.big_vision import load_npz_checkpoint

        model = load_npz_checkpoint(p, final_logit_softcap=final_logit_softcap)
    elif p.exists():
        from ..weights.hf import load_hf_checkpoint

        model = load_hf_checkpoint(p, device="cpu", final_logit_softcap=final_logit_softcap)
    else:
        raise FileNotFoundError(f"model={path!r}: no such checkpoint folder or .npz file")
    return model.to(device=device, dtype=dtype)


def load_tokenizer(cfg: TrainConfig):
    from ..tokenizer import Tokenizer

    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    folder = Path(cfg.model) if Path(cfg.model).is_dir() else Path(cfg.model).parent
    try:
        return Tokenizer.from_file(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"No tokenizer next to model={cfg.model}; set tokenizer=PATH/tokenizer.json") from None


def import_hook(spec: str, key: str) -> Callable:
    """The function a `package.module:function` config value names (`key` is the config key, for
    the error message)."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"{key}={spec!r}: use 'package.module:function'")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r}: cannot import it ({e})") from None
