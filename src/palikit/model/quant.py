"""Weight quantization: int8 (per output channel, symmetric) and int4 (groups along the input,
asymmetric) Linear layers, the int8 tied embedding / LM head, and the module swap (gpt-fast style:
float model -> quantized modules holding canonical tensors -> the same modules load them from disk).

Owns: round-to-nearest quantization math, the canonical tensors every format stores, the kernel each
device runs, and the swap. Not: files on disk (`weights/quantized.py`), LoRA (peft wraps these
modules as base layers, see `train/modes.py`).

Canonical tensors (device-independent; what `state_dict()` holds and a quantized folder stores):
- int8 Linear / Embedding: `qweight` int8 [N, K], `scales` fp32 [N]: w = q * s (q in [-127, 127]).
- int4 Linear: `qweight` uint8 [N, K/2], two nibbles per byte (high = even k, low = odd k: the layout
  torchao and gpt-fast hand to tinygemm), `scales` and `zeros` fp32 [N, K/G]: w = (q - 8) * s + z.

Kernels (chosen by `palikit bench --kernels` on the project's 2-core AVX-512 CPU, one 16384 x 2048
layer at batch 1, weights cycled past the L3: fp32 `F.linear` 7.3 ms, bf16 4.4 ms,
`_weight_int8pack_mm` 1.9 ms, `_weight_int4pack_mm_for_cpu` 0.9 ms; README "Quantized weights" says
why the faster legacy fbgemm dynamic int8, 0.8 ms, is not used):
- CPU: `torch._weight_int8pack_mm` / `torch._weight_int4pack_mm_for_cpu` with bf16 activations
  (weight-only at decode). Above `DECODE_ROWS` rows (prefill, the vision tower: compute-bound) int8
  runs `torch._int_mm` with activations quantized to int8 per token (dynamic), 1.6x a bf16 GEMM.
- CUDA (NOT run on a GPU yet): int8 as `F.linear(x, q.to(dtype)) * s` (what torchao's int8
  weight-only and gpt-fast compile into one fused kernel under `torch.compile`), int4 as tinygemm
  `torch._weight_int4pack_mm` (torchao's int4 weight-only kernel).
- Gradients (LoRA training on a quantized base): the dequantized weight in `F.linear`, which autograd
  differentiates with respect to the input; the base itself is frozen.
The compute dtype is bf16 inside the kernels and the module returns the input's dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 64  # divides every width of PaliGemma 1/2 and the demo model but SigLIP's 4304
GROUP_SIZES = (32, 64, 128, 256)
DECODE_ROWS = 32  # CPU int8: up to this many rows use the GEMV kernel, more the int8 x int8 GEMM
KERNEL_DTYPE = torch.bfloat16
INT4_ROW_MULTIPLE = 16  # the CPU int4 pack needs N % 16 == 0 (CUDA's N % 8)
QUANTIZED_PARTS = ("language_model.", "vision_tower.", "multi_modal_projector.")
VISION_PARTS = ("vision_tower.", "multi_modal_projector.")
EMBEDDING = "language_model.embed_tokens"


# ------------------------------------------------------------------------------------ math
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q int8 [N, K], scales fp32 [N]); symmetric per row, round to nearest."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [N]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (packed uint8 [N, K/2], scales fp32 [N, G], zeros fp32 [N, G]), G = K/group;
    asymmetric min/max per group of `group_size` inputs, round to nearest; w = (q - 8) * s + z."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)  # [N, G, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, G]
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    zeros = lo + 8 * scales  # tinygemm's zero point: the value of q = 8
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] in [0, 15] -> [N, K/2]: high nibble = even column, low nibble = odd column."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> q uint8 [N, K] (inverse of `pack_int4`)."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed, scales, zeros, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).to(torch.float32)  # [N, K]
    N, K = q.shape
    G = scales.shape[1]
    w = (q.reshape(N, G, K // G) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.reshape(N, K).to(dtype)


# ------------------------------------------------------------------------------------ kernels
def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it when its data is not 64-byte aligned: the CPU kernels use aligned AVX-512
    loads and crash on a tensor memory-mapped from an odd offset of a safetensors file."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, kernel_scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q * s)^T -> [..., N] in x's dtype. `kernel_scales`: `scales` in KERNEL_DTYPE."""
    if torch.is_grad_enabled() and x.requires_grad:  # LoRA training through a frozen base
        return F.linear(x, dequantize_int8(q, scales, x.dtype))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    if x.device.type == "cpu":
        if x2.shape[0] <= DECODE_ROWS:  # decode: memory-bound GEMV on the int8 weight
            y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE), q, kernel_scales)
        else:  # prefill / the tower: compute-bound, int8 x int8 with per-token activation scales
            y = int8_dynamic_matmul(x2, q, scales)
    else:  # CUDA / other: untested on a GPU here (see module docstring)
        y = F.linear(x2, q.to(x.dtype)) * scales.to(x.dtype)
    return y.to(x.dtype).reshape(*lead, q.shape[0])


def int8_dynamic_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float (M > 16) @ (q * s)^T with x quantized to int8 per row (token): `torch._int_mm`
    (oneDNN VNNI) accumulates in int32; 1.6x a bf16 GEMM and 4x fp32 at 272 tokens on this CPU."""
    xf = x.float()
    a = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # [M, 1]
    xq = torch.round(xf / a).to(torch.int8)
    return torch._int_mm(xq, q.t()).float() * a * scales.float()  # [M, N]


class QuantModule(nn.Module):
    """Base of the quantized modules: canonical tensors are buffers (the state dict); `refresh()`
    rebuilds the kernel's own copies after a load or a move (`.to(...)`)."""

    bits: int

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    def refresh(self) -> None:  # overridden
        pass

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self


class Int8Rows(QuantModule):
    """int8 rows with one scale each (`qweight` [N, K], `scales` [N]): the Linear and the embedding."""

    bits = 8

    def refresh(self) -> None:
        """Rebuild the kernel's copies of the canonical tensors (after loading or moving)."""
        if self.scales.device.type != "meta":
            self.qweight = aligned(self.qweight)
            self._kernel_scales = aligned(self.scales.to(KERNEL_DTYPE))

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2  # what a decode step reads (bf16 scales)


class Int8Linear(Int8Rows):
    """A Linear whose weight is int8 per output channel. Attributes as nn.Linear's (in_features,
    out_features, bias) so LoRA wrappers treat it as a base layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.register_buffer("_kernel_scales", None, persistent=False)
        self.refresh()

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q, s = quantize_int8(linear.weight)
        m.qweight, m.scales = q, s
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        m.refresh()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.qweight, self.scales, self._kernel_scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(QuantModule):
    """A Linear whose weight is int4 in groups of `group_size` inputs (asymmetric). Holds the
    canonical tensors and, on CPU/CUDA, the kernel's own packed layout built from them."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        check_int4_shape(in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, G, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.register_buffer("_packed", None, persistent=False)
        self.register_buffer("_scales_zeros", None, persistent=False)
        self._packed_for = "meta"
        self.refresh()

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, device="meta")
        m.qweight, m.scales, m.zeros = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        m.refresh()
        return m

    def refresh(self) -> None:
        dev = self.qweight.device
        self._packed_for = dev.type
        if dev.type == "meta":
            return
        sz = torch.stack((self.scales, self.zeros), dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        self._scales_zeros = aligned(sz.to(KERNEL_DTYPE))
        if dev.type == "cpu":
            q = unpack_int4(self.qweight).to(torch.int32)  # [N, K]
            self._packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        elif dev.type == "cuda":  # untested on a GPU here
            tiles = 8 if self.in_features % 128 == 0 else (4 if self.in_features % 64 == 0 else 2)
            self._packed = torch._convert_weight_to_int4pack(self.qweight.contiguous(), tiles)
        else:
            self._packed = None

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4  # packed nibbles + bf16 (scale, zero) pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or self._packed is None:
            y = F.linear(x, self.dequantized_weight(x.dtype))
        else:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [M, K]
            if self._packed_for == "cpu":
                y = torch._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, self._scales_zeros)
            else:
                y = torch._weight_int4pack_mm(x2, self._packed, self.group_size, self._scales_zeros)
            y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


class Int8Embedding(Int8Rows):
    """The tied embedding / LM head in int8 per row: `forward(ids)` looks rows up (dequantized to the
    model's dtype, the dtype of `scales`), `project(hidden, rows)` is the head over the first `rows`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.register_buffer("_kernel_scales", None, persistent=False)
        self.refresh()

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, device="meta")
        q, s = quantize_int8(emb.weight)
        m.qweight, m.scales = q, s.to(emb.weight.dtype)  # scales carry the model's dtype
        m.refresh()
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)  # [..., H] int8
        return rows.to(self.scales.dtype) * self.scales[ids][..., None]

    def project(self, hidden: torch.Tensor, rows: int) -> torch.Tensor:
        """hidden [..., H] -> logits [..., rows] over the first `rows` embedding rows."""
        return int8_matmul(hidden, self.qweight[:rows], self.scales[:rows], self._kernel_scales[:rows])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding)


def check_int4_shape(in_features: int, out_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    if in_features % group_size or out_features % INT4_ROW_MULTIPLE:
        raise ValueError(f"a {out_features} x {in_features} layer cannot be int4 with group size {group_size}")


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
                _set(model, name, Int8Linear.from_float(linear).to(linear.weight.device))
            else:
                _set(model, name, Int4Linear.from_float(linear, spec.group_size).to(linear.weight.device))
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
