"""Weight quantization: the spec of a quantized model (the `quantization` block of its config.json),
the plan (which layers become int8 / int4), the module swap (gpt-fast style: float model ->
quantized modules holding one kernel copy of each weight -> the same modules load it from disk) and
model-level helpers (bytes, describe, dequantize back to float).

Owns: which layers are quantized and how. Not: the layers and their math (`model/quant_layers.py`,
re-exported here), the CPU kernels (`model/quant_cpu.py`), files on disk (`weights/quantized.py`),
LoRA (peft wraps the quantized Linear layers as base layers, see `train/modes.py`; an adapter kept
unmerged over them is `weights.adapter.LoRADelta`).

Kernels (chosen by `palikit bench --kernels` on the project's 2-core AMD EPYC (Zen 4: AVX-512 VNNI
and BF16, no AMX); README "Quantized weights" has the figures): int8 Linear layers run fbgemm's
dynamic int8 GEMM on its own packed weight (decode and prefill), int4 ones torch's CPU int4 kernel at
decode and an int8 scratch copy + `torch._int_mm` at prefill; the int8 head `_weight_int8pack_mm`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .quant_cpu import DECODE_ROWS
from .quant_layers import (
    GROUP_SIZES,
    INT4_ROW_MULTIPLE,
    KERNEL_DTYPE,
    QUANT_MODULES,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantLinear,
    QuantModule,
    check_int4_shape,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

__all__ = [
    "BITS", "DECODE_ROWS", "DEFAULT_GROUP_SIZE", "GROUP_SIZES", "INT4_ROW_MULTIPLE", "KERNEL_DTYPE", "QUANT_MODULES",
    "Int4Linear", "Int8Embedding", "Int8Linear", "QuantLinear", "QuantModule", "QuantSpec", "check_int4_shape",
    "dequantize_int4", "dequantize_int8", "dequantize_model", "describe", "empty_quantized", "is_quantized",
    "max_abs_error", "pack_int4", "parse_quantize", "plan", "quantize_int4", "quantize_int8", "quantize_model",
    "resident_bytes", "unpack_int4", "weight_bytes",
]

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 64  # divides every width of PaliGemma 1/2 and the demo model but SigLIP's 4304
QUANTIZED_PARTS = ("language_model.", "vision_tower.", "multi_modal_projector.")
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")
EMBEDDING = "language_model.embed_tokens"


# ------------------------------------------------------------------------------------ the swap
@dataclass
class QuantSpec:
    """What was quantized and how: the `quantization` block of a quantized folder's config.json."""

    bits: int
    group_size: int | None = None  # int4 only
    keep_vision: bool = False  # tower + projector stay in the model's float dtype
    method: str = "rtn"  # round to nearest
    embedding_bits: int = 8  # the tied embedding / LM head
    int8_layers: list[str] = field(default_factory=list)  # int4 runs whose widths the groups do not divide
    kept: list[str] = field(default_factory=list)  # float modules besides norms, biases and embeddings

    def to_dict(self) -> dict:
        return {"format": "palikit", "version": 1, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        spec = cls(**known)
        spec.validate()
        return spec

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f" (group {self.group_size})" if self.bits == 4 else "")

    def validate(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"quantization bits {self.bits!r}: palikit quantizes to int8 or int4")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size!r}: use one of {', '.join(map(str, GROUP_SIZES))}")
        if self.method != "rtn" or self.embedding_bits != 8:
            raise ValueError(f"quantization method {self.method!r} / embedding bits {self.embedding_bits}: "
                             "this palikit reads rtn with an int8 embedding")


def parse_quantize(value: str | None) -> int | None:
    """CLI / API text -> bits: None/"none" -> None, "int8" -> 8, "int4" -> 4."""
    if value is None or str(value).lower() in ("none", "off", ""):
        return None
    m = re.fullmatch(r"int([48])", str(value).lower())
    if not m:
        raise ValueError(f"--quantize {value!r}: use int8, int4 or none")
    return int(m.group(1))


def _targets(model: nn.Module, keep_vision: bool) -> list[tuple[str, nn.Linear]]:
    parts = ("language_model.",) if keep_vision else QUANTIZED_PARTS
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(parts)]


def plan(model: nn.Module, bits: int, group_size: int | None = None, keep_vision: bool = False) -> QuantSpec:
    """The spec for quantizing `model`: with an explicit int4 `group_size` every Linear must fit it
    (a clear error otherwise); without one, DEFAULT_GROUP_SIZE and int8 for the layers it does not fit."""
    if bits not in BITS:
        raise ValueError(f"cannot quantize to {bits} bits; use int8 or int4")
    if is_quantized(model):
        raise ValueError(f"the model is already quantized ({describe(model)}); quantize the float checkpoint instead")
    kept = list(VISION_PARTS) if keep_vision else []
    if bits == 8:
        if group_size is not None:
            raise ValueError("--group-size applies to int4 only (int8 is per output channel)")
        return QuantSpec(8, None, keep_vision, kept=kept)
    explicit = group_size is not None
    gs = group_size if explicit else DEFAULT_GROUP_SIZE
    if gs not in GROUP_SIZES:
        raise ValueError(f"--group-size {gs}: use one of {', '.join(map(str, GROUP_SIZES))}")
    misfits = [(n, m) for n, m in _targets(model, keep_vision)
               if m.in_features % gs or m.out_features % INT4_ROW_MULTIPLE]
    if misfits and explicit:
        widths = sorted({m.in_features for _, m in _targets(model, keep_vision)})
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        raise ValueError(
            f"--group-size {gs} does not divide the input width of {len(misfits)} layer(s), e.g. {misfits[0][0]} "
            f"({misfits[0][1].in_features}); this model's input widths are {widths}. Use "
            + (f"--group-size {' or '.join(map(str, fits))}" if fits else "no single group size")
            + ", or leave --group-size out: the default group then keeps the layers it does not fit in int8.")
    return QuantSpec(4, gs, keep_vision, int8_layers=[n for n, _ in misfits], kept=kept)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap the float Linear layers and the tied embedding for quantized ones, in place (each float
    weight is freed as soon as its layer is swapped). Returns the model."""
    fallback = set(spec.int8_layers)
    names = [name for name, _ in _targets(model, spec.keep_vision)]  # names only: each float layer is freed once swapped
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            if spec.bits == 8 or name in fallback:
                _set(model, name, Int8Linear.from_float(linear))
            else:
                _set(model, name, Int4Linear.from_float(linear, spec.group_size))
            del linear
        emb = model.get_submodule(EMBEDDING)
        _set(model, EMBEDDING, Int8Embedding.from_float(emb).to(emb.weight.device))
        del emb
    model.quant_spec = spec
    return model


def empty_quantized(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap in quantized modules of the right shapes on the meta device (loading a quantized folder:
    `load_state_dict(assign=True)` fills them)."""
    fallback = set(spec.int8_layers)
    for name, linear in _targets(model, spec.keep_vision):
        args = (linear.in_features, linear.out_features)
        if spec.bits == 8 or name in fallback:
            _set(model, name, Int8Linear(*args, linear.bias is not None, device="meta"))
        else:
            _set(model, name, Int4Linear(*args, spec.group_size, linear.bias is not None, device="meta"))
    emb = model.get_submodule(EMBEDDING)
    _set(model, EMBEDDING, Int8Embedding(emb.num_embeddings, emb.embedding_dim, device="meta"))
    model.quant_spec = spec
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_MODULES) for m in model.modules())


def describe(model: nn.Module) -> str:
    spec = getattr(model, "quant_spec", None)
    return spec.name if spec is not None else "quantized modules"


def weight_bytes(model: nn.Module, prefix: str = "") -> int:
    """Bytes of the matmul weights under `prefix` as the kernels read them (float weights at their
    dtype), the embedding / head counted once (the head reads all of it)."""
    total = 0
    for name, m in model.named_modules():
        if not name.startswith(prefix):
            continue
        if isinstance(m, QUANT_MODULES):
            total += m.weight_bytes
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, nn.Embedding) and name == EMBEDDING:
            total += m.weight.numel() * m.weight.element_size()
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's weights hold in memory: each quantized module's kernel copy (`resident_bytes`)
    plus every other parameter and buffer (each storage once)."""
    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            total += m.resident_bytes
            if isinstance(m, QuantLinear) and m.bias is not None:
                total += m.bias.numel() * m.bias.element_size()
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def max_abs_error(w: torch.Tensor, module: nn.Module) -> float:
    """Largest |w - dequantized| of one layer, relative to max |w| (tests and the model card)."""
    return float((w.float() - module.dequantized_weight()).abs().max() / w.float().abs().max().clamp(min=math.ulp(0)))


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized module by a float nn.Linear / nn.Embedding holding its dequantized
    weight, in place (exporting a fine-tune of a quantized base at full precision)."""
    dtype = dtype or getattr(model, "dtype", torch.float32)
    for name, m in list(model.named_modules()):
        if not isinstance(m, QUANT_MODULES):
            continue
        w = m.dequantized_weight(dtype)
        if isinstance(m, Int8Embedding):
            new = nn.Embedding(m.num_embeddings, m.embedding_dim, device=w.device, dtype=dtype)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dtype)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().to(dtype))
        new.weight = nn.Parameter(w)
        _set(model, name, new)
    if hasattr(model, "quant_spec"):
        del model.quant_spec
    return model
