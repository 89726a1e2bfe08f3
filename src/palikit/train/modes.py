"""What is trainable: `full`, `attention` (the fine-tuning colab's recipe: only the decoder's
attention q/k/v/o projections, trained with plain SGD), `lora` (peft adapters on chosen modules),
plus the `freeze_vision` (SigLIP + projector, big_vision's `img/*`) and `freeze_decoder`
(Gemma incl. embeddings, `llm/*`) switches.

`lora_targets=all-linear` adapts every Linear of the decoder (not the vision tower); adapters on disk: `weights/adapter.py`.
LoRA uses `peft.inject_adapter_in_model`, so the model stays a plain `PaliGemmaModel` (same forward,
same state-dict names plus `lora_A`/`lora_B`); `merge_lora` folds the adapters into the base
weights and restores the original module tree, ready for `save_hub_checkpoint`.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..weights.layouts import LANGUAGE, PROJECTOR, VISION
from .config import ATTENTION_REGEX

ALL_LINEAR = "all-linear"  # lora_targets shortcut


def all_linear_targets(model: nn.Module) -> list[str]:
    """`lora_targets=all-linear`: every `nn.Linear` of the Gemma decoder (attention q/k/v/o and MLP
    gate/up/down of every layer). The vision tower and the projector are NOT included (name them or
    give a regex to adapt them too); the output head is tied to the embedding and is no Linear."""
    from ..model.quant import Int4Linear, Int8Linear

    linear = (nn.Linear, Int8Linear, Int4Linear)  # a quantized base's layers too
    return [n for n, m in model.named_modules() if n.startswith("language_model.") and isinstance(m, linear)]


ATTENTION_PARAM_RE = re.compile(ATTENTION_REGEX + r"\.weight$")
VISION_PREFIXES = (VISION, PROJECTOR)  # palikit's module prefixes: weights/layouts.py
DECODER_PREFIXES = (LANGUAGE,)


def _is_lora_name(name: str) -> bool:
    return ".lora_" in name


def apply_mode(
    model: nn.Module,
    mode: str = "full",
    *,
    freeze_vision: bool = False,
    freeze_decoder: bool = False,
    lora_targets: str | list[str] = ATTENTION_REGEX,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> list[str]:
    """Set `requires_grad` for the mode (in place; LoRA injects adapters) and return the trainable
    parameter names. The freeze switches apply on top of `full` (and restrict `attention` / LoRA
    targets to the unfrozen part)."""
    from ..model.quant import describe, is_quantized

    if is_quantized(model) and mode != "lora":  # a `palikit quantize` folder: integer weights cannot train
        raise ValueError(f"the model is quantized ({describe(model)}): its weights cannot be fine-tuned "
                         f"(mode={mode}). Train LoRA adapters on it (mode=lora, QLoRA-style), or fine-tune the "
                         "float checkpoint and quantize the result.")
    if mode in ("lora", "qlora") and lora_targets == ALL_LINEAR:  # before quantizing turns them into Linear4bit
        lora_targets = all_linear_targets(model)
    if mode == "qlora":  # 4-bit NF4 frozen decoder linears + LoRA adapters
        from .qlora import quantize_base

        quantize_base(model)
    if mode in ("lora", "qlora"):
        inject_lora(model, lora_targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
    for name, p in model.named_parameters():
        if mode == "full":
            train = True
        elif mode == "attention":
            train = bool(ATTENTION_PARAM_RE.fullmatch(name))
        elif mode in ("lora", "qlora"):
            train = _is_lora_name(name)
        else:
            raise ValueError(f"unknown mode {mode!r}; use full, attention, lora or qlora")
        if freeze_vision and name.startswith(VISION_PREFIXES):
            train = False
        if freeze_decoder and name.startswith(DECODER_PREFIXES):
            train = False
        p.requires_grad_(train)
    names = trainable_names(model)
    if not names:
        raise ValueError(f"mode={mode!r} with freeze_vision={freeze_vision}, freeze_decoder={freeze_decoder} leaves nothing to train")
    return names


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ LoRA
def _targets(lora_targets: str | list[str]):
    """A regex string stays a regex (peft full-matches it on module names); "a,b" -> names."""
    if isinstance(lora_targets, str) and "," in lora_targets and not any(c in lora_targets for c in "\\()[]|*+?"):
        return [t.strip() for t in lora_targets.split(",") if t.strip()]
    return lora_targets


def inject_lora(model: nn.Module, lora_targets, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("mode=lora needs peft: pip install peft") from None
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=_targets(lora_targets), bias="none")
    from ..model.quant import Int4Linear, Int8Linear, is_quantized

    if is_quantized(model):  # peft's own LoRA Linear wraps palikit's quantized layers as base layers (unmerged)
        from peft.tuners.lora.layer import Linear as LoraLinear

        cfg._register_custom_module({Int8Linear: LoraLinear, Int4Linear: LoraLinear})
    try:
        with warnings.catch_warnings():  # peft flags palikit's quantized layers as "unsupported": it wraps them fine
            warnings.filterwarnings("ignore", message="Unsupported layer type '<class 'palikit.model.quant")
            inject_adapter_in_model(cfg, model)
    except ValueError as e:
        if "not found" not in str(e):
            raise
    n = sum(1 for name, _ in model.named_parameters() if _is_lora_name(name))
    if not n:
        raise ValueError(f"lora_targets={lora_targets!r} matched no module (names look like "
                         "language_model.layers.0.self_attn.q_proj)")
    return model


def has_lora(model: nn.Module) -> bool:
    return any(_is_lora_name(n) for n, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the plain base layer back, in place.
    Afterwards the state dict has exactly the original names (exportable as a Hub checkpoint)."""
    from peft.tuners.lora import LoraLayer

    from ..model.quant import QUANT_MODULES, dequantize_model
    from .qlora import dequantize_all, dequantized_weight, is_4bit, to_linear

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in targets:
        base = module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = isinstance(base, QUANT_MODULES)
        if is_4bit(base) or quantized:  # QLoRA: fold into the dequantized weight at full precision (no re-quantizing)
            with torch.no_grad():
                w = base.dequantized_weight() if quantized else dequantized_weight(base)
                for adapter in module.active_adapters:
                    w = w + module.get_delta_weight(adapter).float()
            setattr(parent, child, to_linear(base, w))
            continue
        with torch.no_grad():
            module.merge()
        setattr(parent, child, base)
    dequantize_all(model)  # quantized layers without an adapter
    dequantize_model(model)  # palikit-quantized ones too: the merged model is a float checkpoint
    return model


def load_lora_adapter(model: nn.Module, folder, *, merge: bool = False) -> nn.Module:
    """Inject LoRA layers where a PEFT-format adapter (`weights/adapter.py`) has weights and load them
    (trainable again: resuming or stacking a fine-tune); with `merge=True` fold them into the base
    weights afterwards. Inference merges without peft: `weights.adapter.merge_adapter`."""
    from peft.tuners.lora import LoraLayer

    from ..weights.adapter import adapted_linears, read_adapter

    cfg, layers = read_adapter(folder)
    adapted_linears(model, folder, cfg, layers)  # every target a Linear of the right shape
    inject_lora(model, sorted(layers), rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                dropout=float(cfg.get("lora_dropout", 0.0)))
    injected = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, d in layers.items():
            for kind, t in d.items():
                getattr(injected[name], kind)["default"].weight.copy_(t)
    return merge_lora(model) if merge else model
