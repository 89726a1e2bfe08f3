"""QLoRA: the frozen decoder's linear layers stored in 4-bit NF4 (bitsandbytes, double-quantized
statistics), LoRA adapters trained on top in full precision. Export dequantizes the base and folds
the adapters in at full precision (never re-quantizing), so the result is an ordinary checkpoint.
"""

from __future__ import annotations

import re

import torch
from torch import nn

DECODER_LINEARS = r"language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("mode=qlora needs bitsandbytes: pip install bitsandbytes") from None
    return bnb


def is_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def quantize_base(model: nn.Module, pattern: str = DECODER_LINEARS, compute_dtype: torch.dtype | None = None) -> int:
    """Swap every nn.Linear whose name full-matches `pattern` for a frozen NF4 Linear4bit, in place."""
    bnb = _bnb()
    regex = re.compile(pattern)
    swapped = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and regex.fullmatch(name)):
            continue
        w = module.weight
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype or w.dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w.data.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        q = q.to(w.device)  # quantizes on the way
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        swapped += 1
    if not swapped:
        raise ValueError(f"qlora: no linear layer matches {pattern!r}")
    return swapped


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    bnb = _bnb()
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()  # [out, in]


def to_linear(layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().to(weight.dtype))
    return out


def dequantize_all(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every remaining Linear4bit by an nn.Linear with the dequantized weight, in place."""
    n = 0
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, to_linear(module, dequantized_weight(module).to(dtype)))
            n += 1
    return n
