"""`palikit bench`: inference speed against transformers on the same random weights; the last
stdout line is one JSON document."""

from __future__ import annotations

import json

import typer

from . import app


@app.command()
def bench(
    model: str = typer.Option("tiny-pg1", help="Preset name or checkpoint folder (random weights of that shape)."),
    batch_sizes: str = typer.Option("1,4", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(32, help="Tokens generated per request (EOS ignored)."),
    prompt_len: int = typer.Option(16, help="Text prompt tokens (after the image tokens)."),
    repeats: int = typer.Option(3, help="Timed repeats per point (median)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU)."),
    transformers: bool = typer.Option(True, help="Also time transformers in the same run."),
    compile: bool = typer.Option(False, help="torch.compile the decode step (CUDA graphs on GPU)."),
):
    """Prefill ms, ms per decode step and images/s across batch sizes."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..weights.resolve import get_config
    from ..engine.bench import run_bench
    from ..runtime import resolve_device, resolve_dtype

    dev = resolve_device(device)
    console = Console(stderr=True)
    report = run_bench(
        get_config(model), batch_sizes=tuple(int(b) for b in batch_sizes.split(",")), new_tokens=new_tokens,
        prompt_len=prompt_len, repeats=repeats, device=dev, dtype=resolve_dtype(dtype, dev),
        compare_transformers=transformers, compile=compile, log=lambda m: console.log(m),
    )
    table = Table("engine", "batch", "prefill ms", "ms / decode step", "images/s",
                  title=f"{report['model']} on {report['device']} ({report['dtype']}, {report['torch_threads']} torch "
                        f"threads, {new_tokens} new tokens; prefill and decode step per batch, images/s total)")
    for r in report["rows"]:
        table.add_row(r["engine"], str(r["batch_size"]), f"{r['prefill_ms']:.2f}", f"{r['decode_step_ms']:.3f}",
                      f"{r['images_per_s']:.1f}")
    console.print(table)
    for b, ratio in report.get("compile_speedup", {}).items():
        console.print(f"batch {b}: the compiled step is {ratio:.2f}x the eager one's speed")
    for b, ratio in report["speedup_vs_transformers"].items():
        console.print(f"batch {b}: decode step {ratio['decode_step_speedup']:.1f}x faster, "
                                   f"images/s {ratio['images_per_s_ratio']:.1f}x")
    del torch
    print(json.dumps(report))
