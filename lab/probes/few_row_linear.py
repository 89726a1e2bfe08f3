"""Probe: fp32 `F.linear` against the same product as `(W @ x.T).T` at 1-32 rows on this CPU, for
PaliGemma 2 3B's decoder shapes and its 257k-token head (the measurement behind `model.layers.linear`,
which takes the second path on AMD CPUs). Prints a table and ends with one JSON line.

    python -m lab.probes.few_row_linear [--rows 1,2,4,8,16,32] [--repeats 5]
    python -m lab.probes.few_row_linear --step-layers 4   # also: the engine's decode step, path on vs off

`--step-layers N` times `SlotBatch.step` (greedy, eager) on PaliGemma 2 3B-224 at full width with N
decoder layers and the full head (random weights, fp32) at 1, 4 and 16 live rows, with `linear`'s
few-row path on and off in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from palikit.runtime import cpu_model, cpu_vendor

SHAPES = {"q/o 2304x2048": (2048, 2304), "gate/up 9216x2304": (9216, 2304), "down 2304x9216": (2304, 9216),
          "head 257152x2304": (257152, 2304)}


def _ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step-layers", type=int, default=0)
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    out = {"cpu": cpu_model(), "vendor": cpu_vendor(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "ms": {}}
    print(f"{out['cpu']} ({out['vendor']}), torch {out['torch']}, {out['threads']} threads; ms per call, fp32")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.02
        for m in rows:
            x = torch.randn(m, k, generator=g)
            a = _ms(lambda: F.linear(x, w), args.repeats)
            b = _ms(lambda: torch.mm(w, x.T).T.contiguous(), args.repeats)
            out["ms"][f"{name} rows={m}"] = {"F.linear": a, "W@x.T": b}
            print(f"{name:18s} rows {m:2d}: F.linear {a:8.2f}  W @ x.T {b:8.2f}  ({a / b:.2f}x)")
        del w
    if args.step_layers:
        out["step_ms"] = step_times(args.step_layers, args.repeats)
    print(json.dumps(out))


def step_times(n_layers: int, repeats: int) -> dict:
    from palikit.bench.quant import shrink
    from palikit.engine.slots import SlotBatch
    from palikit.model import layers
    from palikit.testing import random_model
    from palikit.weights.resolve import get_config

    model = random_model(shrink(get_config("pg2-3b-224"), n_layers), "cpu", torch.float32)
    times, original = {}, layers._few_rows_transposed
    try:
        for rows in (1, 4, 16):
            batch = SlotBatch(model, rows, 320)
            batch.live[:] = True
            batch.host_live = [True] * rows
            for on in (False, True, False, True):  # interleaved; the second of each is kept
                layers._few_rows_transposed = (lambda v: lambda: v)(on)
                with torch.no_grad():
                    batch.write.fill_(280), batch.positions.fill_(280)
                    batch.host_write = [280] * rows
                    times[f"rows={rows} {'W@x.T' if on else 'F.linear'}"] = _ms(lambda: batch.step(False), repeats)  # noqa: B023
            off, on_ = times[f"rows={rows} F.linear"], times[f"rows={rows} W@x.T"]
            print(f"decode step, {n_layers} layers, {rows:2d} rows: F.linear {off:7.1f} ms, W @ x.T {on_:7.1f} ms "
                  f"({off / on_:.2f}x)")
    finally:
        layers._few_rows_transposed = original
    return times


if __name__ == "__main__":
    main()
