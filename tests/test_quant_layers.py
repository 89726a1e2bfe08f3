"""The quantized layers keep ONE copy of each weight, in the CPU kernel's layout: the int8 Linear
fbgemm's packed weight, the int4 Linear torch's CPU int4 pack. The portable tensors a folder stores
come back from it exactly (the int4 pack's inverse, partial blocks included), a folder written by the
first quantized release (fp32 int4 scales / zeros, not rounded to bf16) still loads, and the int4
prefill path (int8 scratch + `_int_mm`) matches the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from palikit.model import quant as Q
from palikit.model import quant_cpu as C
from palikit.testing import random_linear



@pytest.mark.parametrize("n", [16, 64, 80, 144, 4304 // 16 * 16])  # pairs-only, one block, block + partial
def test_cpu_int4_pack_has_an_exact_inverse(n):
    codes = torch.randint(0, 16, (n, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = C.cpu_int4_pack(codes)
    assert packed.shape == (n, 64) and packed.dtype == torch.uint8
    assert torch.equal(C.cpu_int4_codes(packed), codes)
    C.check_cpu_int4_codes(codes, packed)  # raises when torch's layout changed


def _tensor_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.buffers() if t is not None)


def test_int4_linear_holds_only_the_kernel_pack_and_gives_the_portable_tensors_back():
    lin = random_linear(80, 128, bias=True)
    m = Q.Int4Linear.from_float(lin, 32)
    q, s, z = Q.quantize_int4(lin.weight, 32)
    held = {k for k, t in m.named_buffers() if t is not None}
    assert held == {"_packed", "_scales_zeros"}  # no second copy of the codes
    assert _tensor_bytes(m) == m.weight_bytes == m.resident_bytes == 80 * 64 + 80 * 4 * 4
    sd = m.state_dict()
    assert torch.equal(sd["qweight"], q) and torch.equal(sd["scales"], s) and torch.equal(sd["zeros"], z)
    again = Q.Int4Linear(128, 80, 32, bias=True)
    again.load_state_dict(sd)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())


def test_int8_linear_holds_only_fbgemms_packed_weight():
    # torch's x86 CPU wheel (what palikit installs) ships fbgemm; elsewhere int8 takes another kernel
    assert C.fbgemm_available(), "this torch has no fbgemm engine: the int8 CPU kernel is fbgemm's"
    lin = random_linear(96, 64)
    m = Q.Int8Linear.from_float(lin)
    assert m.kernel == "fbgemm" and _tensor_bytes(m) == 0  # the packed weight is the only copy
    assert m.resident_bytes <= m.weight_bytes + 96 * 16
    q, s = Q.quantize_int8(lin.weight)
    assert torch.equal(m.qweight, q) and torch.equal(m.scales, s)  # fbgemm's unpack is exact


def test_an_int4_folder_from_the_first_release_still_loads():
    """Part 1 stored fp32 scales / zeros straight from min/max; the kernel computes with them in bf16."""
    lin = random_linear(64, 128, seed=3)
    g = lin.weight.detach().reshape(64, 4, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).reshape(64, 128)
    old = {"qweight": Q.pack_int4(codes), "scales": s, "zeros": lo + 8 * s}
    m = Q.Int4Linear(128, 64, 32)
    m.load_state_dict(old)
    assert torch.equal(m.state_dict()["qweight"], old["qweight"])
    w = Q.dequantize_int4(old["qweight"], s.bfloat16().float(), old["zeros"].bfloat16().float())
    x = torch.randn(3, 128)
    ref = F.linear(x, w)
    torch.testing.assert_close(m(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("n", [64, 80])  # whole blocks; a partial last block unpacked directly
def test_int4_prefill_through_the_int8_scratch_matches_the_dequantized_weight(n):
    lin = random_linear(n, 128, seed=4, bias=True)
    m = Q.Int4Linear.from_float(lin, 32)
    scratch = C.int4_to_int8_scratch(m._packed, m._scales_zeros, 32)
    assert scratch is not None, "the int4 -> int8 fold did not compile: prefill fell back to the int4 kernel"
    q8, chan = scratch  # [K, N] int8, [N]
    w = m.dequantized_weight()
    assert q8.shape == (128, n) and q8.dtype == torch.int8
    assert ((q8.float() * chan - w.t()).abs() <= chan / 2 + 1e-6).all()  # one more rounding, half an int8 step
    x = torch.randn(C.DECODE_ROWS + 8, 128)
    ref = F.linear(x, w, lin.bias)
    torch.testing.assert_close(m(x), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_gives_the_same_bits_alone_as_in_any_batch(bits):
    """A request's answer must not depend on what shares its batch (the engine admits requests as they
    arrive, so batching varies run to run): each row's output is bit-identical alone and beside other
    rows, rows of a very different range and free slots holding NaN / inf included, at decode and
    prefill row counts. fbgemm's `linear_dynamic` took one activation range per call: a lone row was
    quantized on its own range, in a batch on the batch's, and the random tiny model's first token
    flipped (test_compiled_decode_equals_eager_on_a_quantized_model failed 3 in 13)."""
    lin = random_linear(96, 64, seed=5)
    m = Q.Int8Linear.from_float(lin) if bits == 8 else Q.Int4Linear.from_float(lin, 32)
    x = torch.randn(C.DECODE_ROWS, 64, generator=torch.Generator().manual_seed(1))
    x[0] = x[0].abs()  # one-sided: a range of its own
    x[1] *= 1e3
    alone = torch.cat([m(x[i: i + 1]) for i in range(4)])
    for batch in (x[:4], x):
        torch.testing.assert_close(m(batch)[:4], alone, rtol=0, atol=0)
    spoiled = x[:4].clone()
    spoiled[2, 3], spoiled[3] = float("nan"), float("inf")
    torch.testing.assert_close(m(spoiled)[:2], alone[:2], rtol=0, atol=0)
    if bits == 8:  # prefill row counts take the same kernel; so does the int8 head
        long = torch.cat([x[:4], torch.randn(100, 64)])
        torch.testing.assert_close(m(long)[:4], alone, rtol=0, atol=0)
        head = Q.Int8Embedding.from_float(nn.Embedding(96, 64))
        alone = torch.cat([head.project(x[i: i + 1], 90) for i in range(4)])
        for batch in (x[:4], long, spoiled):
            torch.testing.assert_close(head.project(batch, 90)[:2], alone[:2], rtol=0, atol=0)
