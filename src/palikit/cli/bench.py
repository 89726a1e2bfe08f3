"""`palikit bench`, `palikit bench-serve`, `palikit bench-train`: thin commands over `palikit.bench`. Each
prints a table (stderr for `bench`'s rich table) and ends stdout with one JSON document."""

from __future__ import annotations

import json
import sys

import typer

from . import app

DEVICE = typer.Option("auto", help="cpu, cuda or auto.")
DTYPE = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU).")


@app.command()
def bench(
    model: str = typer.Option("tiny-pg1", help="Preset name or checkpoint folder (random weights of that shape)."),
    batch_sizes: str = typer.Option("1,4", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(32, help="Tokens generated per request (EOS ignored)."),
    prompt_len: int = typer.Option(16, help="Text prompt tokens (after the image tokens)."),
    repeats: int = typer.Option(3, help="Timed repeats per point (median)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    transformers: bool = typer.Option(True, help="Also time transformers in the same run."),
    compile: bool = typer.Option(False, help="torch.compile the decode step (CUDA graphs on GPU)."),
    quantize: str = typer.Option(None, "--quantize", help="Rows of weight formats at batch 1 in one run, e.g. "
                                 "none,bf16,int8,int4: ms per decode step and prefill against the memory-read floor (--model defaults "
                                 "to pg2-3b-224 there)."),
    layers: int = typer.Option(None, help="--quantize: decoder and tower layers to build (full width and head); "
                                          "default all."),
    group_size: int = typer.Option(None, help="--quantize: int4 group size (default 64)."),
    kernels: bool = typer.Option(False, "--kernels", help="Time the candidate CPU int8/int4 kernels on one layer."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads (0 = torch's default); recorded in the JSON "
                                              "with the machine's load average."),
    constrained: str = typer.Option(None, "--constrained", help="detect or segment: ms per decode step of a full "
                                    "slot batch on the demo model (--model: another checkpoint), raw against the "
                                    "constrained grammar on every row (slots = the largest --batch-sizes)."),
):
    """Inference speed against transformers on the same random weights: prefill ms, ms per decode step
    and images/s across batch sizes."""
    from rich.console import Console
    from rich.table import Table

    _set_threads(torch_threads)

    if constrained is not None:
        return _bench_constrained(model, constrained, max(int(b) for b in batch_sizes.split(",")), new_tokens, repeats)
    if quantize is not None or kernels:
        from .bench_quant import bench_quantized

        return bench_quantized(model, quantize, layers=layers, group_size=group_size, kernels=kernels,
                               new_tokens=new_tokens, prompt_len=prompt_len, repeats=repeats, compile=compile,
                               transformers=transformers)

    from ..bench.inference import run_bench, speed_words
    from ..runtime import resolve_device, resolve_dtype
    from ..weights.resolve import get_config

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
        console.print(f"batch {b}: the compiled step is {speed_words(ratio, 'the eager one')}")
    for b, ratio in report["speedup_vs_transformers"].items():
        console.print(f"batch {b}: palikit's decode step is {speed_words(ratio['decode_step_speedup'], 'transformers')}"
                      f"; images/s {speed_words(ratio['images_per_s_ratio'])}")
    load = report["load_average"]
    console.print(f"{report['cpu_count']} CPUs, {report['cpus_busy_before']} in use just before the run; load average "
                  f"{load['start']} before, {load['end']} after (1, 5, 15 min)")
    for w in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}")
    print(json.dumps(report))


def _set_threads(n: int) -> None:
    if n < 0:
        raise ValueError(f"--torch-threads must be >= 0 (0 = torch's default), got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


@app.command("bench-serve")
def bench_serve(
    model: str = typer.Option(None, help="Checkpoint folder / Hub id, or a preset name (random weights); "
                              "default: the bundled demo model."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    requests: int = typer.Option(480, help="Requests in the trace."),
    rate: float = typer.Option(120.0, help="Mean arrivals per second (Poisson)."),
    seed: int = typer.Option(0, help="Trace seed (same seed, same trace)."),
    slots: int = typer.Option(16, help="Scheduler slots = run-to-completion max batch."),
    mix: str = typer.Option("short=0.5,caption=0.3,long=0.2", help="Class weights."),
    max_new_tokens: str = typer.Option("short=256,caption=256,long=256", help="Token budget per class (one for "
                                       "all: what clients that set max_tokens once send)."),
    backends: str = typer.Option("abc", help="Which of (a) continuous, (b) run-to-completion, (c) transformers."),
    timeout: float = typer.Option(600.0, help="Seconds after the last arrival before a request counts as lost."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Skip the streaming check."),
    adapters: int = typer.Option(0, "--adapters", help="Multi-LoRA: the trace spread over N random adapters, against "
                                 "the base model alone and against swapping merged adapters per batch (one run)."),
    lora_ranks: str = typer.Option("8,16", help="--adapters: LoRA ranks, cycled over the adapters (the largest is "
                                   "--max-lora-rank)."),
    layers: int = typer.Option(None, help="With a preset --model: decoder and tower layers to build (full width, "
                                          "full head); default all."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads (0 = torch's default); recorded in the JSON."),
):
    """Serving benchmark: throughput, p50/p99 latency and time to first token under mixed open-loop traffic
    (continuous batching vs run-to-completion batches vs transformers, same weights, same trace)."""
    from ..bench.serve import check_options, format_report, load_pg, parse_classes, run_serve_bench

    weights = parse_classes(mix, "--mix", float)
    budgets = parse_classes(max_new_tokens, "--max-new-tokens", int)
    check_options(n_requests=requests, rate=rate, slots=slots, timeout_s=timeout, backends=backends,
                  max_new_tokens=budgets)
    from ..bench.lora import parse_ranks

    ranks = parse_ranks(lora_ranks)
    _set_threads(torch_threads)
    pg = load_pg(model, device, dtype, layers)
    if adapters:
        from ..bench.lora import format_lora_report, run_lora_bench

        report = run_lora_bench(pg, n_adapters=adapters, n_requests=requests, rate=rate, seed=seed, slots=slots,
                                max_new_tokens=budgets, ranks=ranks)
        print(format_lora_report(report))
        print(json.dumps(report))
        return
    report = run_serve_bench(pg, n_requests=requests, rate=rate, seed=seed, slots=slots, mix=weights,
                             max_new_tokens=budgets, backends=backends, timeout_s=timeout, stream=not no_stream,
                             progress=sys.stderr.isatty())
    print(format_report(report))
    print(json.dumps(report))


@app.command("bench-train")
def bench_train(
    model: str = typer.Option("tiny-pg2", help="Preset name or checkpoint folder (random weights of that shape)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    batch_size: int = typer.Option(8, help="Examples per step."),
    prefix_len: int = typer.Option(8, help="Prompt tokens (after the image tokens)."),
    suffix_len: int = typer.Option(16, help="Answer tokens (the loss)."),
    rank: int = typer.Option(8, help="LoRA rank (alpha = 2 x rank) on the q/k/v/o projections."),
    steps: int = typer.Option(10, help="Timed optimizer steps (after 2 warm-up steps)."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch's default)."),
):
    """Training throughput: palikit LoRA against transformers + peft with the same LoRA, weights and batch
    (samples/s, ms/step, peak memory, each engine in its own process)."""
    from ..bench.train import format_report, run_train_bench

    report = run_train_bench(model=model, device=device, dtype=dtype, batch_size=batch_size, prefix_len=prefix_len,
                             suffix_len=suffix_len, rank=rank, steps=steps, threads=threads)
    print(format_report(report))
    print(json.dumps(report))


def _bench_constrained(model: str, task: str, slots: int, new_tokens: int, repeats: int) -> None:
    from rich.console import Console

    from ..bench.constrained import run_constrained_bench

    console = Console(stderr=True)
    r = run_constrained_bench(None if model == "tiny-pg1" else model, task=task, slots=slots, new_tokens=new_tokens,
                              repeats=repeats, log=console.log)
    console.print(f"{r['model']}, {r['slots']} slots of {task}, {r['cpu']} ({r['torch_threads']} torch threads): raw "
                  f"{r['raw_ms_per_step']:.3f} ms / decode step, constrained {r['constrained_ms_per_step']:.3f} ms "
                  f"({r['overhead_pct']:+.1f} %)")
    print(json.dumps(r))
