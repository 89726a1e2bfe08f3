"""Quantized layers: int8 (per output channel, symmetric) and int4 (groups along the input,
asymmetric) Linear layers and the int8 tied embedding / LM head, with the round-to-nearest math and
the portable tensors a quantized folder stores. The swap and the spec live in `model/quant.py`, the
CPU kernels in `model/quant_cpu.py`.

Portable ("canonical") tensors: what `state_dict()` holds and a quantized folder stores:
- int8 Linear / Embedding: `qweight` int8 [N, K], `scales` fp32 [N]: w = q * s (q in [-127, 127]).
- int4 Linear: `qweight` uint8 [N, K/2], two nibbles per byte (high = even k, low = odd k: the layout
  torchao and gpt-fast hand to tinygemm), `scales` and `zeros` fp32 [N, K/G] holding bf16 values
  (what the kernels compute with): w = (q - 8) * s + z.

In memory each Linear keeps ONE copy of its weight, in its kernel's layout; `state_dict()` recovers
the portable tensors from it exactly (`canonical()`), and loading builds the kernel copy (`adopt()`):
- int8 on CPU: fbgemm's packed weight (decode and prefill, activations 8-bit per token); without
  fbgemm the plain codes with `_weight_int8pack_mm` (decode) / `_int_mm` (prefill).
- int4 on CPU: torch's CPU int4 pack, `_weight_int4pack_mm_for_cpu` at decode; prefill folds it into a
  scratch int8 copy one layer at a time (`quant_cpu.int4_to_int8_scratch`) for `_int_mm`.
- CUDA (NOT run on a GPU yet): int8 plain codes, `F.linear(x, q.to(dtype)) * s` (what torchao's int8
  weight-only compiles into one kernel); int4 tinygemm `_weight_int4pack_mm`, beside the portable
  codes (no inverse of tinygemm's layout here).
- Gradients (LoRA training on a quantized base): the dequantized weight in `F.linear`.
The embedding is read by rows, so it keeps the plain int8 table (`_weight_int8pack_mm` as the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_cpu as C

KERNEL_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the CPU int4 pack needs N % 16 == 0 (CUDA's N % 8)


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
    asymmetric min/max per group of `group_size` inputs, scale and zero rounded to bf16 (the kernels'
    dtype) and the codes rounded to nearest against them; w = (q - 8) * s + z."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)  # [N, G, gs]
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # [N, G]
    scales = ((hi - lo) / 15).clamp(min=1e-12).to(KERNEL_DTYPE).float()
    zeros = (lo + 8 * scales).to(KERNEL_DTYPE).float()  # tinygemm's zero point: the value of q = 8
    q = torch.round((g - zeros[..., None]) / scales[..., None] + 8).clamp(0, 15).to(torch.uint8).reshape(N, K)
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


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it when its data is not 64-byte aligned: the CPU kernels use aligned AVX-512
    loads and crash on a tensor memory-mapped from an odd offset of a safetensors file."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def check_int4_shape(in_features: int, out_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    if in_features % group_size or out_features % INT4_ROW_MULTIPLE:
        raise ValueError(f"a {out_features} x {in_features} layer cannot be int4 with group size {group_size}")


# ------------------------------------------------------------------------------------ layers
class QuantModule(nn.Module):
    """Base of the quantized modules (`bits`, `dequantized_weight`, `weight_bytes`, `resident_bytes`)."""

    bits: int

    @property
    def device(self) -> torch.device:  # overridden
        raise NotImplementedError

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:  # overridden
        raise NotImplementedError


class QuantLinear(QuantModule):
    """A quantized Linear: nn.Linear's attributes (in_features, out_features, bias) so LoRA wrappers
    treat it as a base layer; `qweight` / `scales` (/ `zeros`) give the portable tensors (recovered
    from the kernel's copy on each access: cheap, but not free). The kernel copy is held in buffers
    that `state_dict()` skips and `.to(dtype)` leaves alone; moving to another device rebuilds it."""

    CANONICAL: tuple[str, ...] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device="meta", dtype=dtype), requires_grad=False) if bias else None
        self._device = torch.device("meta")

    # the portable tensors <-> the kernel copy (overridden)
    def canonical(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adopt(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def canonical_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def qweight(self) -> torch.Tensor:
        return self.canonical()["qweight"]

    @property
    def scales(self) -> torch.Tensor:
        return self.canonical()["scales"]

    def _init_storage(self, tensors: dict[str, torch.Tensor] | None, device) -> None:
        if tensors is None:  # an empty layer of the right shapes (loading fills it)
            tensors = {k: torch.zeros(shape, dtype=dt, device=device) for k, (shape, dt) in self.canonical_shapes().items()}
        if self.bias is not None and self.bias.device != tensors["qweight"].device:
            self.bias = nn.Parameter(torch.zeros_like(self.bias, device=tensors["qweight"].device), requires_grad=False)
        self.adopt(tensors)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        for k, t in self.canonical().items():
            destination[prefix + k] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = {prefix + k for k in self.CANONICAL}
        own = {k: v for k, v in state_dict.items() if k not in names}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        tensors = {k: state_dict[prefix + k] for k in self.CANONICAL if prefix + k in state_dict}
        missing_keys += [prefix + k for k in self.CANONICAL if k not in tensors]
        bad = [f"{prefix}{k}: {tuple(tensors[k].shape)} {tensors[k].dtype}, expected {shape} {dt}"
               for k, (shape, dt) in self.canonical_shapes().items()
               if k in tensors and (tuple(tensors[k].shape) != shape or tensors[k].dtype.is_floating_point != dt.is_floating_point
                                    or (not dt.is_floating_point and tensors[k].dtype != dt))]
        error_msgs += bad
        if len(tensors) == len(self.CANONICAL) and not bad:
            with torch.no_grad():
                self.adopt({k: t.detach().to(dt) for (k, t), (_, dt) in zip(tensors.items(), self.canonical_shapes().values())})

    def _apply(self, fn, recurse=True):
        """`.to(...)`, `.cuda()`, `to_empty(...)`: the bias follows `fn`; the kernel copy keeps its dtypes
        and is rebuilt from the portable tensors when the device changes."""
        target = fn(torch.empty(0, device=self._device)).device
        kernel = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kernel)
        if target != self._device:
            with torch.no_grad():
                moved = {k: fn(t).to(t.dtype) for k, t in self.canonical().items()}
            self.adopt(moved)
        return self

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:  # overridden
        raise NotImplementedError

    def _out(self, y: torch.Tensor, x: torch.Tensor, lead) -> torch.Tensor:
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _grad_forward(self, x: torch.Tensor) -> torch.Tensor:
        """LoRA training through a frozen base: autograd differentiates `F.linear` w.r.t. the input."""
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8Linear(QuantLinear):
    """A Linear whose weight is int8 per output channel."""

    bits = 8
    CANONICAL = ("qweight", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, dtype)
        for name in ("_q", "_s", "_ks"):  # the plain layout (CUDA, meta, CPU without fbgemm)
            self.register_buffer(name, None, persistent=False)
        self._fbgemm: C.PackedInt8 | None = None  # fbgemm's packed weight (CPU)
        self._init_storage(None, device)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q, s = quantize_int8(linear.weight)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        m.adopt({"qweight": q.to(linear.weight.device), "scales": s.to(linear.weight.device)})
        return m

    def canonical_shapes(self):
        return {"qweight": ((self.out_features, self.in_features), torch.int8),
                "scales": ((self.out_features,), torch.float32)}

    def adopt(self, tensors):
        q, s = tensors["qweight"], tensors["scales"].float()
        self._fbgemm = None
        self._device = q.device
        if q.device.type == "cpu" and C.fbgemm_available():
            self._fbgemm = C.PackedInt8.from_codes(q, s)
            self._q = self._s = self._ks = None
        else:
            self._q, self._s = (aligned(q), s) if q.device.type == "cpu" else (q, s)
            self._ks = aligned(s.to(KERNEL_DTYPE)) if q.device.type == "cpu" else s.to(KERNEL_DTYPE)

    def canonical(self):
        if self._fbgemm is not None:
            q, s = self._fbgemm.unpack()
            return {"qweight": q, "scales": s}
        return {"qweight": self._q, "scales": self._s}

    @property
    def kernel(self) -> str:
        if self._fbgemm is not None:
            return "fbgemm"
        return "torch int8" if self._device.type == "cpu" else "dequantize"

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        c = self.canonical()
        return dequantize_int8(c["qweight"], c["scales"], dtype)

    @property
    def weight_bytes(self) -> int:
        return self.in_features * self.out_features + self.out_features * 2  # what a decode step reads

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory: the codes once, plus per-row scales (fbgemm: scale, zero point, column offset)."""
        per_row = 16 if self._fbgemm is not None else 6
        return self.in_features * self.out_features + self.out_features * per_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self._grad_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self._fbgemm is not None:
            y = self._fbgemm(x2)
        elif self._device.type == "cpu":
            if x2.shape[0] <= C.DECODE_ROWS:  # decode: memory-bound GEMV on the int8 weight
                y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self._q, self._ks)
            else:  # prefill: int8 x int8 with per-token activation scales
                y = C.int8_dynamic_matmul(x2, self._q.t(), self._s)
        else:  # CUDA / other: untested on a GPU here (see module docstring)
            y = F.linear(x2, self._q.to(x.dtype)) * self._s.to(x.dtype)
        return self._out(y, x, lead)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel ({self.kernel})"


class Int4Linear(QuantLinear):
    """A Linear whose weight is int4 in groups of `group_size` inputs (asymmetric)."""

    bits = 4
    CANONICAL = ("qweight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, device=None,
                 dtype=None):
        check_int4_shape(in_features, out_features, group_size)
        super().__init__(in_features, out_features, bias, dtype)
        self.group_size = group_size
        for name in ("_packed", "_scales_zeros", "_q", "_s", "_z"):
            self.register_buffer(name, None, persistent=False)
        self._init_storage(None, device)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        m = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None, device="meta")
        q, s, z = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        dev = linear.weight.device
        m.adopt({"qweight": q.to(dev), "scales": s.to(dev), "zeros": z.to(dev)})
        return m

    def canonical_shapes(self):
        G = self.in_features // self.group_size
        return {"qweight": ((self.out_features, self.in_features // 2), torch.uint8),
                "scales": ((self.out_features, G), torch.float32), "zeros": ((self.out_features, G), torch.float32)}

    def adopt(self, tensors):
        q, s, z = tensors["qweight"], tensors["scales"], tensors["zeros"]
        self._device = dev = q.device
        self._packed = self._scales_zeros = self._q = self._s = self._z = None
        if dev.type not in ("cpu", "cuda"):  # meta / other: the portable tensors only
            self._q, self._s, self._z = q, s.float(), z.float()
            return
        sz = torch.stack((s, z), dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        self._scales_zeros = aligned(sz.to(KERNEL_DTYPE))
        if dev.type == "cpu":  # the kernel's layout is the only copy
            self._packed = C.cpu_int4_pack(unpack_int4(q))
        else:  # CUDA, untested on a GPU here: tinygemm's layout beside the portable codes
            tiles = 8 if self.in_features % 128 == 0 else (4 if self.in_features % 64 == 0 else 2)
            self._packed = torch._convert_weight_to_int4pack(q.contiguous(), tiles)
            self._q = q

    def canonical(self):
        if self._scales_zeros is None:
            return {"qweight": self._q, "scales": self._s, "zeros": self._z}
        sz = self._scales_zeros.float().transpose(0, 1)  # [N, G, 2]
        if self._q is not None:
            q = self._q
        else:
            codes = C.cpu_int4_codes(self._packed)  # [N, K]
            C.check_cpu_int4_codes(codes, self._packed)
            q = pack_int4(codes)
        return {"qweight": q, "scales": sz[..., 0].contiguous(), "zeros": sz[..., 1].contiguous()}

    @property
    def zeros(self) -> torch.Tensor:
        return self.canonical()["zeros"]

    @property
    def kernel(self) -> str:
        return {"cpu": "torch int4", "cuda": "tinygemm"}.get(self._device.type, "dequantize")

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        c = self.canonical()
        return dequantize_int4(c["qweight"], c["scales"], c["zeros"], dtype)

    @property
    def weight_bytes(self) -> int:
        G = self.in_features // self.group_size
        return self.in_features * self.out_features // 2 + self.out_features * G * 4  # nibbles + bf16 (scale, zero)

    @property
    def resident_bytes(self) -> int:
        extra = self.in_features * self.out_features // 2 if self._q is not None else 0  # CUDA: the portable codes too
        return self.weight_bytes + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or self._scales_zeros is None:
            return self._grad_forward(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self._device.type == "cpu":
            y = None
            if x2.shape[0] > C.DECODE_ROWS and not torch.compiler.is_compiling():  # prefill: int8 scratch + _int_mm
                scratch = C.int4_to_int8_scratch(self._packed, self._scales_zeros, self.group_size)
                if scratch is not None:
                    y = C.int8_dynamic_matmul(x2, *scratch)
            if y is None:
                y = torch._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self._packed, self.group_size,
                                                      self._scales_zeros)
        else:
            y = torch._weight_int4pack_mm(x2.to(KERNEL_DTYPE), self._packed, self.group_size, self._scales_zeros)
        return self._out(y, x, lead)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size} "
                f"({self.kernel})")


class Int8Embedding(QuantModule):
    """The tied embedding / LM head in int8 per row: `forward(ids)` looks rows up in the plain table
    (dequantized to the model's dtype, the dtype of `scales`), `project(hidden, rows)` is the head over
    the first `rows`. On a CPU with fbgemm the head runs a packed copy of the table (on the 257k x 2304
    head fbgemm took 0.5-0.85x `_weight_int8pack_mm`'s time here, and gives fp32 logits, not bf16 ones
    whose rounding ties greedy choices): a second copy in memory, counted by `resident_bytes`."""

    bits = 8

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.register_buffer("_kernel_scales", None, persistent=False)
        self._fbgemm: C.PackedInt8 | None = None  # the head's packed copy (CPU with fbgemm)
        self._packed_from: tuple = ()  # what it was packed from (refresh repacks only on a change)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh(loaded=True))
        self.refresh()

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, device="meta")
        q, s = quantize_int8(emb.weight)
        m.qweight, m.scales = q, s.to(emb.weight.dtype)  # scales carry the model's dtype
        m.refresh()
        return m

    def refresh(self, loaded: bool = False) -> None:
        """Rebuild the kernel's copies after loading (`loaded`: the tensors may have been written in
        place) or moving."""
        if self.scales.device.type == "meta":
            return
        self.qweight = aligned(self.qweight)
        self._kernel_scales = aligned(self.scales.to(KERNEL_DTYPE))
        source = (self.qweight.data_ptr(), self.scales.data_ptr(), self.scales.dtype)
        if self.qweight.device.type == "cpu" and C.fbgemm_available():
            if loaded or source != self._packed_from:
                self._fbgemm, self._packed_from = None, ()  # free the old copy before packing the new one
                self._fbgemm, self._packed_from = C.PackedInt8.from_codes(self.qweight, self.scales.float()), source
        else:
            self._fbgemm, self._packed_from = None, ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.refresh()
        return self

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2  # what the head reads (bf16 scales)

    @property
    def resident_bytes(self) -> int:
        table = self.qweight.numel() + self.scales.numel() * (self.scales.element_size() + 2)
        head = self.qweight.numel() + self.num_embeddings * 16 if self._fbgemm is not None else 0
        return table + head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)  # [..., H] int8
        return rows.to(self.scales.dtype) * self.scales[ids][..., None]

    def project(self, hidden: torch.Tensor, rows: int) -> torch.Tensor:
        """hidden [..., H] -> logits [..., rows] over the first `rows` embedding rows."""
        q, s, ks = self.qweight[:rows], self.scales[:rows], self._kernel_scales[:rows]
        if torch.is_grad_enabled() and hidden.requires_grad:
            return F.linear(hidden, dequantize_int8(q, s, hidden.dtype))
        lead = hidden.shape[:-1]
        h2 = hidden.reshape(-1, self.embedding_dim)  # [M, H]
        if self._fbgemm is not None:
            y = self._fbgemm(h2)  # [M, V] fp32: every row packed, the first `rows` kept
            y = y if rows == self.num_embeddings else y[:, :rows]
        elif h2.device.type == "cpu":
            if h2.shape[0] <= C.DECODE_ROWS:
                y = torch._weight_int8pack_mm(h2.to(KERNEL_DTYPE), q, ks)
            else:
                y = C.int8_dynamic_matmul(h2, q.t(), s)
        else:
            y = F.linear(h2, q.to(hidden.dtype)) * s.to(hidden.dtype)
        return y.to(hidden.dtype).reshape(*lead, rows)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding)
