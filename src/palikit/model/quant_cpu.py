"""The CPU kernels behind the quantized layers (`model/quant.py`), each holding the ONE copy of a
weight the layer keeps in memory, and the exact way back from it to the portable codes a quantized
folder stores.

Owns:
- int8 Linear: fbgemm's packed weight (`torch.ops.quantized.linear_prepack`, per output channel) run by
  `quantized::linear_with_input_q_dq_qweight_dq_output_fp32`, wrapped as the custom op
  `palikit::int8_fbgemm_linear` so `torch.compile(fullgraph=True)` treats it as opaque. Activations
  are 8 bits per token, symmetric: each row is scaled to max |x| = 1 and quantized with ONE fixed
  scale and zero point (`act_qparams`), so a row's codes, and its output, depend on that row alone:
  bit-identical whatever shares the batch (fbgemm's `linear_dynamic` took its range from the whole
  call, so a request's answer changed with its batch mates: the flaky compiled == eager test). 8 bits
  where the CPU has VNNI (exact int32 accumulation); without VNNI fbgemm's u8 x s8 int16 pairs could
  saturate, so 7 bits there. `linear_unpack` gives the codes and scales back exactly.
- int4 Linear: torch's CPU int4 pack (`_convert_weight_to_int4pack_for_cpu`, the layout
  `_weight_int4pack_mm_for_cpu` reads) and its inverse (`cpu_int4_codes`, the layout documented in
  ATen's `int4mm_kernel.cpp`; `check_cpu_int4_codes` proves it by packing again).
- int4 prefill (more than `DECODE_ROWS` rows): the packed nibbles are folded, one layer at a time, into a
  scratch int8 [K, N] copy with one scale per output channel (`int4_to_int8_scratch`, a kernel
  torch.compile generates once per shape) and multiplied by `torch._int_mm` with per-token int8
  activations; the int4 kernel's own GEMM re-dequantizes the weight every 4 rows.
- per-token int8 activations x int8 weight (`int8_dynamic_matmul`, `torch._int_mm`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import warnings
import weakref

import torch

log = logging.getLogger(__name__)

DECODE_ROWS = 32  # up to this many rows a layer is memory-bound (decode); more: compute-bound (prefill)


# ------------------------------------------------------------------------------- fbgemm int8
@functools.cache
def fbgemm_available() -> bool:
    """fbgemm's quantized engine is built into this torch (x86 CPUs with AVX2 or better)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def act_qparams() -> tuple[float, int]:
    """(scale, zero point) of the uint8 activation codes of rows scaled to [-1, 1]: codes 1..255 with
    VNNI; 0..128 without (7 bits: fbgemm's AVX2 u8 x s8 pairs would saturate int16 beyond that)."""
    caps = getattr(torch.cpu, "get_capabilities", lambda: {})()
    return (1 / 127, 128) if caps.get("avx512_vnni", False) else (2 / 127, 64)


def fbgemm_pack(q: torch.Tensor, scales: torch.Tensor):
    """int8 codes [N, K] + fp32 scales [N] -> fbgemm's packed weight (a torchbind object holding
    the only copy; `q` can be freed)."""
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm's prepack still takes one
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(q.contiguous(), scales.double(), zeros, 0)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"  # "x86" would pick oneDNN, which keeps a second copy
    try:
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous


def fbgemm_unpack(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact codes int8 [N, K] and fp32 scales [N] back from a packed weight."""
    qw, _ = torch.ops.quantized.linear_unpack(packed)
    return qw.int_repr(), qw.q_per_channel_scales().float()


def fbgemm_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x fp32 [M, K] @ W^T -> fp32 [M, N]; activations 8-bit per token, each row on its own (see the
    module docstring)."""
    a = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # [M, 1]: each row to max |x| = 1
    # a non-finite row (a free engine slot) stays non-finite in its own output only
    xs = torch.nan_to_num(x / a, nan=0.0, posinf=0.0, neginf=0.0).contiguous()
    scale, zero = act_qparams()
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xs, scale, zero, packed) * a


_PACKED: dict[int, object] = {}  # handle -> packed weight (what the compiled graph refers to)
_HANDLES = itertools.count(1)


class PackedInt8:
    """One int8 weight in fbgemm's packed layout (the only copy of it) and the handle the custom op
    finds it by; `(x)` runs it, eagerly or as the opaque op inside a compiled graph. A copy
    (deepcopy) shares the read-only packed weight under a handle of its own; pickling stores the
    codes and scales."""

    def __init__(self, packed, out_features: int):
        self.packed, self.out_features = packed, out_features
        self.handle = next(_HANDLES)
        _PACKED[self.handle] = packed
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor) -> PackedInt8:
        return cls(fbgemm_pack(q, scales), q.shape[0])

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fbgemm_unpack(self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float [M, K] -> fp32 [M, N]."""
        xf = x.float().contiguous()
        if torch.compiler.is_compiling():  # opaque to the compiler
            return int8_fbgemm_linear(xf, self.handle, self.out_features)
        return fbgemm_linear(xf, self.packed)

    def __deepcopy__(self, memo) -> PackedInt8:
        return PackedInt8(self.packed, self.out_features)

    def __reduce__(self):
        return PackedInt8.from_codes, self.unpack()


@torch.library.custom_op("palikit::int8_fbgemm_linear", mutates_args=())
def int8_fbgemm_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """`fbgemm_linear` for compiled graphs: opaque to torch.compile (the packed weight is no tensor)."""
    return fbgemm_linear(x, _PACKED[handle])


@int8_fbgemm_linear.register_fake
def _(x, handle, out_features):
    return x.new_empty(x.shape[0], out_features)


# ------------------------------------------------------------------------------- int8 x int8
def int8_dynamic_matmul(x: torch.Tensor, q_kn: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] float (M > 16) @ q_kn (int8 [K, N], or a transposed [N, K]) * scales [N] -> fp32
    [M, N], x quantized to int8 per row (token): `torch._int_mm` (oneDNN VNNI) accumulates in int32."""
    xf = x.float()
    a = (xf.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)  # [M, 1]
    xq = torch.round(xf / a).to(torch.int8)
    return torch._int_mm(xq, q_kn).float() * a * scales.float()


# ------------------------------------------------------------------------------- CPU int4 layout
def _int4_block() -> int:
    """Rows per block of torch's CPU int4 pack: 64 on AVX-512 builds, 32 otherwise (ATen: 4 floats vectors)."""
    return 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32


def _vectorized_layout() -> bool:
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def cpu_int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in [0, 15] -> torch's CPU int4 layout, uint8 [N, K/2]."""
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def cpu_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `cpu_int4_pack`: uint8 [N, K/2] -> codes uint8 [N, K]. Layout (ATen
    int4mm_kernel.cpp): blocks of BN rows (64 with AVX-512, 32 with AVX2), each stored k-major as
    [K, BN/2] bytes whose byte j holds row j (low nibble) and row j + BN/2 (high); a last partial block,
    and every block without AVX2/AVX-512, holds rows (2i, 2i + 1) in byte i instead."""
    N, K = packed.shape[0], packed.shape[1] * 2
    flat = packed.reshape(-1)
    bn = _int4_block()
    full = (N // bn) * bn if _vectorized_layout() else 0
    out = torch.empty(N, K, dtype=torch.uint8)
    if full:
        b = flat[: full * K // 2].view(full // bn, K, bn // 2)  # [NB, K, BN/2]
        codes = torch.cat((b & 15, b >> 4), dim=2)  # [NB, K, BN]: rows j and j + BN/2
        out[:full] = codes.permute(0, 2, 1).reshape(full, K)
    start = full
    while start < N:  # pairs layout, one block of up to `bn` rows at a time
        rows = min(bn, N - start)
        b = flat[start * K // 2: (start + rows) * K // 2].view(K, rows // 2)
        out[start: start + rows] = torch.stack((b & 15, b >> 4), dim=-1).reshape(K, rows).t()
        start += rows
    return out


def check_cpu_int4_codes(codes: torch.Tensor, packed: torch.Tensor) -> None:
    """Packing the recovered codes again must give the kernel's bytes (a changed torch layout fails here)."""
    if not torch.equal(cpu_int4_pack(codes), packed):
        raise RuntimeError(f"torch {torch.__version__}'s CPU int4 layout is not the one palikit unpacks "
                           f"({torch.backends.cpu.get_cpu_capability()}); cannot save this int4 model exactly. "
                           "Report it with your torch version; saving on a CPU with AVX-512 or AVX2 works.")


# ------------------------------------------------------------------------------- int4 prefill
def _fold_blocks(packed_full: torch.Tensor, mult: torch.Tensor, offset: torch.Tensor, group: int, bn: int) -> torch.Tensor:
    """Full blocks of the CPU int4 layout -> int8 [K, N'] = round(q * mult + offset), mult/offset
    [G, N'] per (group, output channel). Written so the generated loop reads the packed bytes and
    writes the int8 rows once (no intermediate nibble tensors)."""
    Nf, K = packed_full.shape[0], packed_full.shape[1] * 2
    nb, ng = Nf // bn, K // group
    b = packed_full.view(nb, ng, group, bn // 2).permute(1, 2, 0, 3)[:, :, :, None, :]  # [G, gs, NB, 1, BN/2]
    b = b.expand(ng, group, nb, 2, bn // 2)
    shift = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(2, 1)
    q = ((b >> shift) & 15).float()  # [G, gs, NB, 2, BN/2]: low nibbles are rows j, high rows j + BN/2
    m = mult.view(ng, 1, nb, 2, bn // 2)
    o = offset.view(ng, 1, nb, 2, bn // 2)
    return torch.round(q * m + o).to(torch.int8).reshape(K, Nf)


@functools.cache
def _compiled_fold():
    """One kernel per layer shape (static shapes vectorize; symbolic ones ran 20x slower here)."""
    return torch.compile(_fold_blocks, dynamic=False, fullgraph=True)


FOLD_SHAPES = 256  # a model has ~8 int4 shapes and a test run more, past dynamo's default of 8 per function


def _fold(*args):
    """The compiled fold with room for every layer shape: dynamo's recompile limit is raised for the
    call itself (a global setting was undone by other code's `config.patch` and then failed with
    fullgraph=True after 8 shapes)."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=FOLD_SHAPES,
                             accumulated_recompile_limit=max(dynamo_config.accumulated_recompile_limit, FOLD_SHAPES)):
        return _compiled_fold()(*args)


_FOLD = {"compiled": True}  # set False once compiling failed (no C++ compiler): the int4 kernel then runs prefill


def int4_to_int8_scratch(packed: torch.Tensor, scales_zeros: torch.Tensor, group: int):
    """The int4 layer as int8 [K, N] with per-output-channel fp32 scales [N] (None when the fast fold
    is unavailable). w = (q - 8) * s + z per group; the channel scale is max |w| / 127 over the row
    (from each group's end points), so int8 = round(w / channel scale): one more rounding of at most
    half an int8 step on top of the int4 one."""
    if not _FOLD["compiled"]:
        return None
    sz = scales_zeros.float()  # [G, N, 2]
    s, z = sz[..., 0], sz[..., 1]
    lo, hi = z - 8 * s, z + 7 * s  # [G, N]: the values of codes 0 and 15
    chan = (torch.maximum(lo.abs(), hi.abs()).amax(dim=0) / 127).clamp(min=1e-12)  # [N]
    mult, offset = s / chan, lo / chan  # [G, N]
    N = packed.shape[0]
    bn = _int4_block()
    full = (N // bn) * bn if _vectorized_layout() else 0
    try:
        parts = [_fold(packed[:full], mult[:, :full].contiguous(), offset[:, :full].contiguous(), group, bn)
                 ] if full else []
    except Exception as e:  # noqa: BLE001 - inductor without a working compiler: fall back for good
        _FOLD["compiled"] = False
        log.warning("int4 prefill: torch.compile of the int4 -> int8 fold failed (%s: %.200s); prefill runs "
                    "torch's int4 kernel instead (slower)", type(e).__name__, e)
        return None
    if full < N:  # a partial last block (e.g. SigLIP's 4304 rows): unpacked directly, it is small
        q = cpu_int4_codes(packed)[full:].float()  # [n, K]
        K = q.shape[1]
        m = mult[:, full:].t().repeat_interleave(group, dim=1)  # [n, K]
        o = offset[:, full:].t().repeat_interleave(group, dim=1)
        parts.append(torch.round(q * m + o).to(torch.int8).t())
        assert parts[-1].shape == (K, N - full)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), chan
