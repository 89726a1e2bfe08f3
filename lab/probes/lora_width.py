"""How much does the multi-LoRA delta cost next to a decoder layer's own Linears, by model width?
(issue 34: on the demo model, hidden 192, 8 slots x rank 16 = 128 LoRA columns per Linear, about as
many multiply-adds as the base Linears; on a real PaliGemma width they are a few percent.)

One decoder layer's seven Linears (q/k/v/o/gate/up/down at the widths of a `palikit.config` preset,
or the demo model's), fp32, a decode step of B rows (x [B, 1, H]), eager, timed three ways on the
same weights: the Linears alone, with `model.lora.LoRASlots` installed and every row on one of the S
adapters (the engine's decode path), and with the slots installed but every row on the base model
(the hooks skip). Prints the ratios and one JSON line.

    python -m lab.probes.lora_width --width demo --width pg2-3b-224
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from palikit.model.lora import LoRASlots

WIDTHS = {"demo": (192, 768, 4, 1, 48)}  # hidden, mlp, heads, kv heads, head dim (the demo model's config.json)


def widths(name: str) -> tuple[int, int, int, int, int]:
    if name in WIDTHS:
        return WIDTHS[name]
    from palikit.config import PRESETS

    t = PRESETS[name].text
    return t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim


class Layer(nn.Module):
    """A decoder layer's Linears, called in the order the model calls them (activations in between)."""

    def __init__(self, h: int, mlp: int, heads: int, kv: int, hd: int):
        super().__init__()
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(h, heads * hd), lin(h, kv * hd), lin(h, kv * hd), \
            lin(heads * hd, h)
        self.gate_proj, self.up_proj, self.down_proj = lin(h, mlp), lin(h, mlp), lin(mlp, h)

    @property
    def device(self):
        return self.q_proj.weight.device

    @property
    def dtype(self):
        return self.q_proj.weight.dtype

    def forward(self, x):  # [B, 1, H]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        a = self.o_proj(q + 0.0) + x + (k.sum() + v.sum()) * 0  # k and v used, as attention would
        return self.down_proj(nn.functional.gelu(self.gate_proj(a)) * self.up_proj(a))


def timed(f, x, reps: int) -> float:
    for _ in range(3):
        f(x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            f(x)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


@torch.no_grad()
def measure(name: str, rows: int, slots: int, rank: int) -> dict:
    layer = Layer(*widths(name))
    x = torch.randn(rows, 1, layer.q_proj.in_features)
    reps = max(3, int(2e8 / sum(p.numel() for p in layer.parameters()) / rows))
    plain = timed(layer, x, reps)
    lora = LoRASlots(layer, slots, rank, targets=[n for n, m in layer.named_modules() if isinstance(m, nn.Linear)],
                     max_rows=rows)
    for m in lora.modules.values():  # every slot filled (random), every module targeted
        m.lora_A_slots.normal_(0, 0.02)
        m.lora_B_slots.normal_(0, 0.02)
        m.lora_slots_used.update(range(1, slots + 1))
    lora.set_rows([1 + b % slots for b in range(rows)])
    with_lora = timed(layer, x, reps)
    lora.set_rows([0] * rows)
    base_rows = timed(layer, x, reps)
    base_macs = sum(m.in_features * m.out_features for m in lora.modules.values())
    lora_macs = sum(slots * rank * (m.in_features + m.out_features) for m in lora.modules.values())
    return {"width": name, "hidden": layer.q_proj.in_features, "rows": rows, "slots": slots, "rank": rank,
            "threads": torch.get_num_threads(), "linears_ms": plain * 1e3, "with_lora_ms": with_lora * 1e3,
            "base_rows_ms": base_rows * 1e3, "lora_vs_linears": plain / with_lora,
            "lora_macs_per_base_mac": lora_macs / base_macs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", action="append", help="demo or a palikit.config preset (repeatable)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from palikit.runtime import cpu_model

    out = [measure(w, args.rows, args.slots, args.rank) for w in args.width or ["demo", "pg2-3b-224"]]
    for r in out:
        print(f"{r['width']} (hidden {r['hidden']}), {r['rows']} rows, {r['slots']} slots x rank {r['rank']}: "
              f"Linears {r['linears_ms']:.3f} ms, + multi-LoRA {r['with_lora_ms']:.3f} ms "
              f"(throughput {r['lora_vs_linears']:.2f}x of the Linears alone; LoRA MACs = "
              f"{r['lora_macs_per_base_mac']:.2f} x the base's), all rows on the base {r['base_rows_ms']:.3f} ms")
    print(json.dumps({"cpu": cpu_model(), "results": out}))


if __name__ == "__main__":
    main()
