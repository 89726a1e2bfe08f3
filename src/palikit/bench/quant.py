"""Quantized-inference benchmark (`palikit bench --quantize none,bf16,int8,int4`): one row per weight
format on the same random weights in one run, batch 1, with transformers (the float default dtype) beside
them, the machine's memory-read bandwidth measured in the same run, and per row the weight bytes one
decode step reads, that floor in ms and the ratio to it. `--kernels` times the candidate CPU kernels on
one layer (the measurement `model/quant.py`'s kernel choice rests on).

Decode is memory-bound at batch 1: a step reads every decoder weight and the whole tied head once, so
`floor_ms = weight_bytes / bandwidth` is the fastest a step can be. The vision tower and the projector
run once per image (prefill, part of time to first token) and are not in a decode step's bytes.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..config import PaliGemmaConfig
from ..model import quant as Q

ROWS = ("none", "bf16", "int8", "int4")


def read_bandwidth_gbs(gib: float = 2.0, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth of summing a `gib` GiB fp32 tensor, GB/s."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes one decode step reads: the decoder's matmul weights and the whole tied head."""
    return Q.weight_bytes(model, prefix="language_model.")


def shrink(config: PaliGemmaConfig, layers: int | None) -> PaliGemmaConfig:
    """`layers` decoder and tower layers (None: all), full width and the full vocabulary head."""
    if not layers:
        return config
    return replace(config, text=replace(config.text, num_hidden_layers=layers),
                   vision=replace(config.vision, num_hidden_layers=layers),
                   name=f"{config.name} ({layers} + {layers} layers, full head)")


def _row(name, model, timing, bandwidth) -> dict:
    wb = decode_weight_bytes(model)
    floor = wb / (bandwidth * 1e9) * 1e3
    return {"quantize": name, "decode_step_ms": timing.decode_step_ms, "prefill_ms": timing.prefill_ms,
            "weight_bytes": wb, "floor_ms": floor, "ratio_to_floor": timing.decode_step_ms / floor}


def run_quant_bench(config: PaliGemmaConfig, formats=ROWS, *, new_tokens: int = 16, prompt_len: int = 16,
                    repeats: int = 2, group_size: int | None = None, compile: bool = False,
                    compare_transformers: bool = True, log=print) -> dict:
    """Every row runs the same seeded random weights: none (fp32, the CPU default) and transformers
    (fp32) on one model, which is then converted to bf16 in place; int8 and int4 each quantize a
    fresh fp32 copy in place (layer by layer), so at most one float model and one transformers copy
    are in memory at a time."""
    from ..testing import random_model
    from .inference import bench_palikit, bench_transformers

    bandwidth = read_bandwidth_gbs()
    log(f"read bandwidth {bandwidth:.1f} GB/s (2 GiB sum, best of 5); building {config.name} with random weights")
    args = ([1], new_tokens, prompt_len, repeats)
    rows, hf_row = [], None

    def timed(name, model):
        log(f"{name}: warm-up, then {repeats} timed runs")
        rows.append(_row(name, model, bench_palikit(model, *args, compile, log)[0], bandwidth))

    model = random_model(config, "cpu", torch.float32, seed=0)
    if "none" in formats:
        timed("none", model)
    if compare_transformers:
        try:
            t = bench_transformers(model, *args, log)[0]
            hf_row = {**_row("transformers", model, t, bandwidth), "dtype": "float32"}
        except ImportError:
            log("transformers is not installed: no transformers row")
        gc.collect()
    if "bf16" in formats:
        timed("bf16", model.to(torch.bfloat16))
    del model
    gc.collect()
    for name in ("int8", "int4"):
        if name in formats:
            model = random_model(config, "cpu", torch.float32, seed=0)
            Q.quantize_model(model, Q.plan(model, int(name[3]), group_size if name == "int4" else None))
            gc.collect()
            timed(f"{name}", model)
            del model
            gc.collect()
    rows.sort(key=lambda r: ROWS.index(r["quantize"]))
    by = {r["quantize"]: r for r in rows}
    speedups = {}
    for base in ("none", "bf16"):
        if base in by:
            speedups[f"vs_{base}"] = {r["quantize"]: {"decode": by[base]["decode_step_ms"] / r["decode_step_ms"],
                                                      "prefill": by[base]["prefill_ms"] / r["prefill_ms"]}
                                      for r in rows if r["quantize"] != base}
    return {
        "model": config.name, "batch_size": 1, "new_tokens": new_tokens,
        "prompt_tokens": config.vision.num_image_tokens + prompt_len, "compiled": compile,
        "bandwidth_gbs": bandwidth, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "cpu": cpu_name(), "rows": rows + ([hf_row] if hf_row else []),
        "speedup": speedups,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    from ..runtime import cpu_model

    name = cpu_model()
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [f for f in ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {' '.join(isa) or 'no AVX-512 VNNI/BF16, no AMX'}"


# ------------------------------------------------------------------------------------ kernels
def kernel_bench(n: int = 16384, k: int = 2048, rows: int = 1, layers: int = 6, repeats: int = 5) -> dict[str, float]:
    """ms per call of each candidate kernel on an n x k layer at `rows` input rows, cycling `layers`
    distinct weights so they come from memory, not the cache (as a decode step does)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(layers)]
    x = torch.randn(rows, k, generator=g)
    xb = x.to(torch.bfloat16)

    def timed(calls) -> float:
        for c in calls:
            c()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t) / len(calls))
        return statistics.median(times) * 1e3

    out = {"fp32 F.linear": timed([lambda w=w: F.linear(x, w) for w in ws])}
    wb = [w.to(torch.bfloat16) for w in ws]
    out["bf16 F.linear"] = timed([lambda w=w: F.linear(xb, w) for w in wb])
    del wb
    plain = [Q.quantize_int8(w) for w in ws]  # (q int8 [n, k], scales fp32 [n])
    ks = [s.to(torch.bfloat16) for _, s in plain]
    out["int8 _weight_int8pack_mm, bf16 act."] = timed(
        [lambda q=q, s=s: torch._weight_int8pack_mm(xb, q, s) for (q, _), s in zip(plain, ks)])
    out["int8 dequantize + bf16 F.linear"] = timed([lambda q=q, s=s: F.linear(xb, q.to(torch.bfloat16)) * s
                                                    for (q, _), s in zip(plain, ks)])
    out["int8 _int_mm, per-token int8 act."] = timed([lambda q=q, s=s: _int_mm(x, q, s) for q, s in plain])
    del plain, ks
    i8 = [Q.Int8Linear.from_float(_lin(w)) for w in ws]
    out[f"int8 Linear, palikit ({i8[0].kernel})"] = timed([lambda m=m: m(x) for m in i8])
    del i8
    for gs in (32, 64, 128):
        i4 = [Q.Int4Linear.from_float(_lin(w), gs) for w in ws]
        out[f"int4 Linear g{gs}, palikit ({i4[0].kernel})"] = timed([lambda m=m: m(x) for m in i4])
    return out


def _lin(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def _int_mm(x, q, s):
    a = (x.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)  # [M, 1] per-token scale
    xq = torch.round(x / a).to(torch.int8)
    pad = max(0, 17 - xq.shape[0])  # _int_mm wants more than 16 rows
    y = torch._int_mm(F.pad(xq, (0, 0, 0, pad)), q.t())[: x.shape[0]]
    return y.float() * a * s
