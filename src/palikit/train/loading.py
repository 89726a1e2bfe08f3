"""What a training run loads before the loop: the base model (a Hub-layout folder, a big_vision
`.npz`, or `demo` / nothing = the bundled demo model, resolved as the CLI does when `--model` is
omitted) through the one loader, its tokenizer, what its card says it knows (`weights.card`), the
text length it takes (`text_limit`) and the optional hooks (`train_source`, metrics)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .config import TrainConfig

TRAIN_HINT = "set model=PATH to a checkpoint folder or big_vision .npz for real weights"  # assets.default_model


def load_model(path: str, device="cpu", dtype=torch.float32, final_logit_softcap="auto"):
    """The checkpoint to train, through the one loader (`weights.load`); `final_logit_softcap` as in
    TrainConfig (None: trained uncapped)."""
    from ..weights.load import load_checkpoint
    from ..weights.resolve import resolve

    files = resolve(path, need_tokenizer=False)
    return load_checkpoint(files, dtype=dtype, final_logit_softcap=final_logit_softcap).to(device)


GEMMA_CONTEXT = 8192  # Gemma / Gemma 2's max_position_embeddings: PaliGemma 1 and 2's text + image context


def model_dir(model: str) -> Path | None:
    """The folder of a model path (a `.npz`'s folder), None when it is not local."""
    p = Path(model)
    return p if p.is_dir() else p.parent if p.exists() else None


def model_limits(model: str) -> dict:
    """The `palikit_limits` of the model's card (`weights.card`; {} when it has none)."""
    from ..weights.card import read_limits

    return read_limits(model_dir(model))


def text_limit(model: str, image_tokens: int) -> tuple[int, str]:
    """(text tokens per example the model takes, where that figure comes from): its card's
    `max_text_tokens`, else config.json's `text_config.max_position_embeddings`, else Gemma's 8192
    context, less the image tokens."""
    limits = model_limits(model)
    if isinstance(limits.get("max_text_tokens"), int):
        return limits["max_text_tokens"], "the model card's max_text_tokens"
    folder = model_dir(model)
    ctx, why = GEMMA_CONTEXT, "Gemma's 8192-token context"
    if folder is not None and (folder / "config.json").is_file():
        import json

        try:
            text = json.loads((folder / "config.json").read_text()).get("text_config") or {}
            if isinstance(text.get("max_position_embeddings"), int):
                ctx, why = text["max_position_embeddings"], "config.json's max_position_embeddings"
        except (json.JSONDecodeError, AttributeError):
            pass
    return ctx - image_tokens, f"{why} less {image_tokens} image tokens"


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
    the error message). Modules are found as `python -m` finds them: installed ones, then the current
    directory (a checkout's `lab.demo.stream`, a project's own module), whichever way palikit started."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"{key}={spec!r}: use 'package.module:function'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # the `palikit` console script does not put it there
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r}: cannot import it ({e})") from None
