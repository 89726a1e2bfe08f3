"""`model.layers.linear` (the decoder's Linears and the tied head): the few-row path it takes in fp32 on
AMD CPUs for large weights, (W @ x.T).T, equals F.linear (values within fp32 rounding, shape,
contiguity) at every row count around its bounds, with and without a bias, 2-D and 3-D inputs; it is
taken only where it should be; `Linear` keeps nn.Linear's parameters and state_dict."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from palikit.model import layers
from palikit.model.layers import FEW_ROWS, Linear, linear


@pytest.fixture(params=[True, False], ids=["transposed-path", "F.linear-path"])
def path(request, monkeypatch):
    monkeypatch.setattr(layers, "_few_rows_transposed", lambda: request.param)
    monkeypatch.setattr(layers, "FEW_ROWS_MIN_WEIGHT", 32)  # the tests' small weights take the path too
    return request.param


@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (4, 1, 24), (16, 1, 24), (FEW_ROWS, 24), (FEW_ROWS + 1, 24),
                                   (3, 7, 24), (2, 40, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(path, shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(56, 24, generator=g)
    b = torch.randn(56, generator=g) if bias else None
    got = linear(x, w, b)
    assert got.shape == (*shape[:-1], 56) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_the_transposed_path_is_taken_only_for_few_fp32_cpu_rows(path, monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(a[0].shape) or real_mm(*a, **k))
    w = torch.randn(8, 4)
    for x in (torch.randn(1, 4), torch.randn(FEW_ROWS + 1, 4), torch.randn(4, 4, dtype=torch.bfloat16)):
        linear(x, w.to(x.dtype))
    linear(torch.randn(3, 4), torch.randn(7, 4))  # a weight below FEW_ROWS_MIN_WEIGHT (28 < 32 elements)
    assert calls == []  # one row, many rows, bf16, a small weight: F.linear
    linear(torch.randn(3, 1, 4), w)
    assert calls == ([(8, 4)] if path else [])


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    m, ref = Linear(6, 5, bias=False), nn.Linear(6, 5, bias=False)
    assert isinstance(m, nn.Linear) and m.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 1, 6)
    torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=1e-6)


def test_an_exported_graph_keeps_f_linear(path):
    """torch.export (the ONNX exporter's front end) sees F.linear even where eager takes the few-row path:
    no guard on a symbolic row count, and the weight stays MatMul's second input for ORT's quantizers."""
    m = Linear(24, 56, bias=False).eval()
    x = torch.randn(3, 1, 24)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(m, (x,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets and "aten.mm.default" not in targets
    torch.testing.assert_close(program.module()(x), F.linear(x, m.weight), atol=1e-5, rtol=1e-5)
