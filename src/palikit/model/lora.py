"""Multi-LoRA in one batch: many adapters over one base model, each batch row picking its own.

Every target Linear (PEFT's names: the decoder's q/k/v/o/gate/up/down projections, the vision
tower's q/k/v/out_proj/fc1/fc2, the projector's linear) gets two non-persistent buffers and an
instance `forward` that adds the row's LoRA delta to its class's output (not a forward hook: the
hook machinery cost ~25 us per Linear per call on the 2-core CPU, as much as the delta's kernels at
the demo model's width):

    A [S, R, in]   B [S, R, out]        (S = max_loras slots, R = max_lora_rank; slot s at index s-1)
    delta[b] = (x[b] @ A[idx[b]-1].T) @ B[idx[b]-1]    idx = the row's slot, 0 = no adapter

A is stored like a Linear weight (rows = rank columns, contiguous `in`), so both paths below read
it without a copy of a transposed view. Two ways to compute the delta, the same numbers: a prompt
(T > 1 tokens per row) gathers each row's A and B (contiguous blocks) and runs two batched matmuls
(the gather is paid once for T tokens; rows on the base model are zeroed by a per-row gate); a
decode step (T = 1) runs two plain matmuls over all slots at once, x @ A.view(S*R, in).T, masked
to the row's own slot's R columns, @ B.view(S*R, out), added in place (`addmm`): no per-row copies
of A and B, whose reads would cost more than the step's own weights when S is smaller than the
batch. An eager step multiplies only the columns from the lowest to the highest slot its rows use
(a view, no copy: a step whose rows use 2 of 8 slots pays for 2 to 8 slots' columns, not 8); a
compiled step keeps all S*R (fixed shapes). The base model has no columns (it used to be a zero
slot 0: 1/(S+1) of the decode's LoRA work for nothing).

An adapter of rank r < R fills the first r rows of its slot of A and B, the rest stay zero; PEFT's
alpha / r scale is folded into B at load; a module an adapter does not target keeps zeros in its
slot. The per-row slot index (`LoRASlots.index`, a fixed tensor) and the masks derived from it are
set once per forward by the engine (`lora_rows`) and read by every target's forward. Writing an
adapter into a slot changes tensor contents, never shapes or module structure: a compiled step is
not recompiled. The base weights and the model's state_dict are untouched (instance forwards and
non-persistent buffers), so a quantized base (`model.quant`) takes a delta the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .quant import Int4Linear, Int8Linear

_LINEAR = (nn.Linear, Int8Linear, Int4Linear)
TOWER_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def default_targets(model: nn.Module) -> list[str]:
    """Every Linear of the decoder layers, the vision tower's encoder layers and the projector (the
    modules PEFT adapters of PaliGemma target: decoder-only, tower + projector, or all)."""
    roots = ("language_model.layers.", "vision_tower.encoder.layers.", "multi_modal_projector.")
    return [n for n, m in model.named_modules() if isinstance(m, _LINEAR) and n.startswith(roots)]


def touches_tower(module_names: Iterable[str]) -> bool:
    """Whether an adapter with these target modules changes image features."""
    return any(n.startswith(TOWER_PREFIXES) for n in module_names)


class LoRASlots:
    """The stacked adapter slots of one model and the per-row slot index its targets' forwards read."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, targets: Sequence[str] | None = None,
                 max_rows: int = 64):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_rank}")
        if getattr(model, "lora_slots", None) is not None:
            raise ValueError("this model already has LoRA slots")
        self.max_loras, self.max_rank = max_loras, max_rank
        dev, dtype = model.device, model.dtype
        self.index = torch.zeros(max_rows, dtype=torch.long, device=dev)  # row -> slot, set per forward
        self._col_slot = torch.arange(max_loras * max_rank, device=dev) // max_rank + 1  # [SR]: column -> slot
        self.mask = torch.zeros(max_rows, max_loras * max_rank, device=dev, dtype=dtype)  # row's own columns
        self.gate = torch.zeros(max_rows, 1, 1, device=dev, dtype=dtype)  # 1 where the row has an adapter
        self.rows_slots: frozenset[int] = frozenset()  # slots the current forward's rows use (eager skip)
        self.columns = slice(0, 0)  # eager decode: the columns of the slots from the lowest to the highest used
        own = dict(model.named_modules())
        self.modules: dict[str, nn.Module] = {}
        self._mask_view = (None, None, None)  # ((rows, columns), mask, its view) of the last eager decode
        for name in targets if targets is not None else default_targets(model):
            m = own.get(name)
            if not isinstance(m, _LINEAR):
                raise ValueError(f"LoRA target {name!r} is not a Linear layer of this model")
            m.register_buffer("lora_A_slots", torch.zeros(max_loras, max_rank, m.in_features, device=dev,
                                                          dtype=dtype), persistent=False)
            m.register_buffer("lora_B_slots", torch.zeros(max_loras, max_rank, m.out_features, device=dev,
                                                          dtype=dtype), persistent=False)
            m.lora_slots_used = set()  # host-side: slots whose adapter targets this module
            m.lora_views = None
            # an instance attribute (no hook machinery per call); a partial of a named function pickles and deep-copies
            m.forward = functools.partial(LoRASlots.forward_with_delta, self, m)
            self.modules[name] = m
        model.lora_slots = self

    def forward_with_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A target Linear's forward while it has LoRA slots: its class's forward, then the rows' deltas
        (skipped in eager mode when no row of this forward has an adapter on this module; a compiled
        step always adds them, masked)."""
        out = type(module).forward(module, x)
        if not torch.compiler.is_compiling() and module.lora_slots_used.isdisjoint(self.rows_slots):
            return out
        return self.add_delta(module, x, out)

    def add_delta(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base Linear's output for `x` [B, T, in]) plus each row's own LoRA delta."""
        Bn, T, _ = x.shape
        A, B = module.lora_A_slots, module.lora_B_slots  # [S, R, in], [S, R, out]
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        acc = out if out.dtype == A.dtype else out.to(A.dtype)  # the base output itself: the delta goes in place
        if T == 1:  # decode: every slot at once (eager: the span of the rows' slots), masked to each row's own
            a_t, b, mask = self._decode_views(module, Bn)
            h = torch.mm(x[:, 0], a_t).mul_(mask)  # [B, SR] (or the span's columns)
            acc[:, 0].addmm_(h, b)  # [B, out]
        else:  # prompt: each row's own A and B
            sel = (self.index[:Bn] - 1).clamp(min=0)  # [B]: slot -> storage index (base rows: gated to 0)
            h = torch.bmm(x, A[sel].transpose(1, 2)) * self.gate[:Bn]  # [B, T, R]
            acc.baddbmm_(h, B[sel])  # [B, T, out]
        return acc if acc.dtype == out.dtype else acc.to(out.dtype)

    def _decode_views(self, module: nn.Module, Bn: int):
        """A.T [in, C], B [C, out] and the rows' mask [Bn, C] over the decode's columns C (all S*R when
        compiling; eager: the span of this forward's slots). Eager steps reuse them while the span and
        the row count stay (views, no copies; rebuilding them cost as much as the delta's kernels)."""
        if torch.compiler.is_compiling():
            return module.lora_A_slots.flatten(0, 1).T, module.lora_B_slots.flatten(0, 1), self.mask[:Bn]
        cols, A = self.columns, module.lora_A_slots
        views = module.lora_views  # keyed on the span and on the buffers themselves (`model.to` replaces them)
        if views is None or views[0] != cols or views[1] is not A:
            views = module.lora_views = (cols, A, A.flatten(0, 1)[cols].T, module.lora_B_slots.flatten(0, 1)[cols])
        if self._mask_view[0] != (Bn, cols) or self._mask_view[1] is not self.mask:  # (`set_rows` may grow it)
            self._mask_view = ((Bn, cols), self.mask, self.mask[:Bn, cols])
        return views[2], views[3], self._mask_view[2]

    def bytes_per_slot(self) -> int:
        return sum((m.lora_A_slots[0].numel() + m.lora_B_slots[0].numel()) * m.lora_A_slots.element_size()
                   for m in self.modules.values())

    @torch.no_grad()
    def write(self, slot: int, layers: dict[str, dict[str, torch.Tensor]], scale: float) -> None:
        """Fill `slot` (1..max_loras) with an adapter: {module: {"lora_A": [r, in], "lora_B": [out, r]}}
        (checked by the caller); modules it does not name get zeros."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"slot {slot} outside 1..{self.max_loras}")
        for name, m in self.modules.items():
            A, B = m.lora_A_slots[slot - 1], m.lora_B_slots[slot - 1]  # [R, in], [R, out]
            A.zero_()
            B.zero_()
            d = layers.get(name)
            m.lora_slots_used.discard(slot)
            if d is not None:
                r = d["lora_A"].shape[0]
                A[:r].copy_(d["lora_A"].to(A.dtype))
                B[:r].copy_((d["lora_B"].float() * scale).T.to(B.dtype))
                m.lora_slots_used.add(slot)

    def set_rows(self, slots: torch.Tensor | Sequence[int]) -> None:
        """Row b of the next forward uses adapter slot `slots[b]` (rows past len(slots): none)."""
        dev = self.index.device
        slots = torch.as_tensor(slots, dtype=torch.long).to(dev)
        n = slots.shape[0]
        if n > self.index.shape[0]:  # a larger batch than any before (eager paths: no compiled step cares)
            self.index = torch.zeros(n, dtype=torch.long, device=dev)
            self.mask = torch.zeros(n, self.mask.shape[1], device=dev, dtype=self.mask.dtype)
            self.gate = torch.zeros(n, 1, 1, device=dev, dtype=self.gate.dtype)
        self.index[:n].copy_(slots)
        self.index[n:].zero_()
        self.mask[:n].copy_(self._col_slot[None] == slots[:, None])
        self.mask[n:].zero_()
        self.gate[:n, 0, 0].copy_(slots > 0)
        self.gate[n:].zero_()
        self.rows_slots = frozenset(slots.tolist()) - {0}
        used = self.rows_slots or {1}
        self.columns = slice((min(used) - 1) * self.max_rank, max(used) * self.max_rank)

    def clear_rows(self) -> None:
        self.index.zero_()
        self.mask.zero_()
        self.gate.zero_()
        self.rows_slots = frozenset()
        self.columns = slice(0, 0)

    def remove(self, model: nn.Module) -> None:
        for m in self.modules.values():
            del m.forward, m.lora_A_slots, m.lora_B_slots, m.lora_slots_used, m.lora_views
        model.lora_slots = None


@contextlib.contextmanager
def lora_rows(model: nn.Module, slots: torch.Tensor | Sequence[int]):
    """Run a forward with row b on adapter slot `slots[b]`; afterwards every row is on the base model
    again (so a plain `model(...)` call elsewhere never sees a stale adapter). No-op without slots."""
    lora = getattr(model, "lora_slots", None)
    if lora is None:
        yield
        return
    lora.set_rows(slots)
    try:
        yield
    finally:
        lora.clear_rows()
