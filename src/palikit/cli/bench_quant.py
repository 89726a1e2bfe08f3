"""`palikit bench --quantize none,bf16,int8,int4` and `palikit bench --kernels`: the quantized-inference
benchmark's table on stderr and one JSON line last on stdout (`bench/quant.py`)."""

from __future__ import annotations

import json


def bench_quantized(model: str, quantize: str | None, *, layers, group_size, kernels, new_tokens, prompt_len,
                    repeats, compile, transformers) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..bench.quant import ROWS, cpu_name, kernel_bench, run_quant_bench, shrink
    from ..weights.resolve import get_config

    console = Console(stderr=True)
    report: dict = {"cpu": cpu_name()}
    if kernels:
        table = Table("kernel", "ms", title=f"one 16384 x 2048 layer, batch 1, weights from memory ({report['cpu']})")
        report["kernels_ms"] = kernel_bench()
        for name, ms in report["kernels_ms"].items():
            table.add_row(name, f"{ms:.2f}")
        console.print(table)
    if quantize is not None:
        formats = [f.strip() for f in quantize.split(",") if f.strip()]
        bad = [f for f in formats if f not in ROWS]
        if bad:
            raise ValueError(f"--quantize {','.join(bad)}: rows are {', '.join(ROWS)}")
        config = shrink(get_config(model if model != "tiny-pg1" else "pg2-3b-224"), layers)
        report.update(run_quant_bench(config, formats, new_tokens=new_tokens, prompt_len=prompt_len, repeats=repeats,
                                      group_size=group_size, compile=compile, compare_transformers=transformers,
                                      log=lambda m: console.log(m)))
        table = Table("weights", "ms / decode step", "prefill ms (TTFT)", "weight bytes / step", "floor ms",
                      "x floor", "decode vs none", "decode vs bf16",
                      title=f"{report['model']}, batch 1, {report['prompt_tokens']} prompt tokens, "
                            f"{report['bandwidth_gbs']:.1f} GB/s read, {report['torch_threads']} threads, "
                            f"{report['cpu']}")
        sp = report["speedup"]
        for r in report["rows"]:
            q = r["quantize"]
            vs = [f"{sp[k][q]['decode']:.2f}x" if q in sp.get(k, {}) else "-" for k in ("vs_none", "vs_bf16")]
            table.add_row(q, f"{r['decode_step_ms']:.1f}", f"{r['prefill_ms']:.0f}", f"{r['weight_bytes'] / 1e9:.2f} GB",
                          f"{r['floor_ms']:.1f}", f"{r['ratio_to_floor']:.2f}", *vs)
        console.print(table)
    print(json.dumps(report))
