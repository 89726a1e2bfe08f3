"""`model.lora.LoRASlots` kernels against the naive formula (issue 34): for every row b on slot s with
adapter (A_s [r, in], B_s [out, r], scale), out[b] = base(x[b]) + scale * x[b] @ A_s.T @ B_s.T, and rows
on slot 0 get the base output exactly. Both paths: the decode step's all-slots masked matmuls (T = 1,
eager and compiled) and the prompt's per-row gathers (T > 1); ranks below the limit, an adapter that
skips a module, a slot rewritten with another adapter."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from palikit.model.lora import LoRASlots, lora_rows

IN, OUT, S, R = 24, 40, 3, 6


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, OUT, bias=False), nn.Linear(OUT, IN, bias=False)

    device = property(lambda self: self.a.weight.device)
    dtype = property(lambda self: self.a.weight.dtype)

    def forward(self, x):  # [B, T, IN]
        return self.b(torch.tanh(self.a(x)))


def _adapter(g, r, modules):
    dims = {"a": (IN, OUT), "b": (OUT, IN)}
    return {m: {"lora_A": torch.randn(r, dims[m][0], generator=g), "lora_B": torch.randn(dims[m][1], r, generator=g)}
            for m in modules}


def _naive(model, x, slots, adapters):
    """Per row, Linear by Linear: the base output plus its own adapter's delta (none on slot 0)."""
    rows = []
    for b, s in enumerate(slots):
        layers, scale = adapters.get(s, ({}, 0.0))

        def lin(name, h):
            y = h @ getattr(model, name).weight.T
            d = layers.get(name)
            return y if d is None else y + scale * (h @ d["lora_A"].T @ d["lora_B"].T)

        rows.append(lin("b", torch.tanh(lin("a", x[b]))))
    return torch.stack(rows)


@pytest.mark.parametrize("slots", [[2, 0, 2], [0, 3, 3, 0], [3, 2, 0], [0, 0]])
def test_decode_over_the_span_of_used_slots_equals_the_naive_formula(slots):
    """An eager decode multiplies only the columns of the slots its rows use (lowest to highest):
    a middle slot alone, the last alone, two of three, none."""
    g = torch.Generator().manual_seed(3)
    model = Two().eval()
    lora = LoRASlots(model, S, R, targets=["a", "b"], max_rows=8)
    adapters = {s: (_adapter(g, R - s, ["a", "b"]), 0.5 * s) for s in (1, 2, 3)}
    for s, (layers, scale) in adapters.items():
        lora.write(s, layers, scale)
    x = torch.randn(len(slots), 1, IN, generator=g)
    with torch.no_grad(), lora_rows(model, slots):
        assert lora.columns == slice((min(set(slots) - {0} or {1}) - 1) * R, max(set(slots) - {0} or {1}) * R)
        got = model(x)
    torch.testing.assert_close(got, _naive(model, x, slots, adapters), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_slots_equal_the_naive_per_row_formula(T):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = Two().eval()
    lora = LoRASlots(model, S, R, targets=["a", "b"], max_rows=8)
    adapters = {1: (_adapter(g, R, ["a", "b"]), 0.5), 2: (_adapter(g, 2, ["a"]), 2.0), 3: (_adapter(g, 4, ["b"]), 1.0)}
    for s, (layers, scale) in adapters.items():
        lora.write(s, layers, scale)
    slots = [2, 0, 1, 3, 1, 0, 3]  # mixed, base rows between
    x = torch.randn(len(slots), T, IN)
    with torch.no_grad(), lora_rows(model, slots):
        got = model(x)
    torch.testing.assert_close(got, _naive(model, x, slots, adapters), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _naive(model, x, [0] * len(slots), {}))  # no rows set: the base
    adapters[1] = (_adapter(g, 3, ["b"]), 1.5)  # another adapter in slot 1: the old one's A/B are gone
    lora.write(1, *adapters[1])
    with torch.no_grad(), lora_rows(model, slots):
        got = model(x)
    torch.testing.assert_close(got, _naive(model, x, slots, adapters), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_equals_the_naive_formula():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = Two().eval()
    lora = LoRASlots(model, S, R, targets=["a", "b"], max_rows=8)
    adapters = {1: (_adapter(g, R, ["a", "b"]), 0.5), 3: (_adapter(g, 2, ["a", "b"]), 1.0)}
    for s, (layers, scale) in adapters.items():
        lora.write(s, layers, scale)
    step = torch.compile(model, fullgraph=True, dynamic=False)
    slots = [3, 0, 1, 1, 0, 3, 3, 0]
    x = torch.randn(len(slots), 1, IN)
    with torch.no_grad(), lora_rows(model, slots):
        got = step(x)
    torch.testing.assert_close(got, _naive(model, x, slots, adapters), atol=1e-5, rtol=1e-5)


def test_a_model_with_slots_pickles_and_deep_copies_and_the_slots_come_off():
    """The targets' instance forwards travel with the model (pickle, deepcopy: bound to the copy's own
    buffers); `remove` gives back the plain Linears."""
    g = torch.Generator().manual_seed(4)
    model = Two().eval()
    lora = LoRASlots(model, S, R, targets=["a", "b"], max_rows=8)
    adapters = {2: (_adapter(g, R, ["a", "b"]), 0.5)}
    lora.write(2, *adapters[2])
    slots, x = [2, 0, 2], torch.randn(3, 1, IN, generator=g)
    want = _naive(model, x, slots, adapters)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert other.a.forward.args[1] is other.a and other.lora_slots is not lora
        with torch.no_grad(), lora_rows(other, slots):
            torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-5)
    lora.remove(model)
    assert "forward" not in vars(model.a) and not hasattr(model.a, "lora_A_slots")
    with torch.no_grad():
        torch.testing.assert_close(model(x), _naive(model, x, [0, 0, 0], {}))
