"""Inference benchmark (`palikit bench`): prefill ms, ms per decode step and images/s across batch sizes for palikit,
and for transformers on the SAME random weights in the same run when it is installed. Timings
include the image encoder (pixel values in, tokens out); image decoding and resizing are excluded
for both. Every run generates exactly `new_tokens` tokens (EOS ignored) so the two are comparable.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..config import PaliGemmaConfig
from ..engine import Engine, GenerationOptions, Request
from ..testing import hf_model_from, random_model

__all__ = ["BenchRow", "bench_palikit", "bench_transformers", "busy_cores", "busy_warning", "load_average",
           "run_bench", "speed_words"]


@dataclass
class BenchRow:
    engine: str
    batch_size: int
    prefill_ms: float
    decode_step_ms: float
    images_per_s: float


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats: int) -> float:
    """Median wall seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _prompt(config: PaliGemmaConfig, prompt_len: int) -> list[int]:
    return [config.bos_token_id] + [min(100 + i, config.output_vocab_size - 1) for i in range(prompt_len - 2)] + [config.bos_token_id + 1]


def bench_palikit(model, batch_sizes, new_tokens, prompt_len, repeats, compile=False, log=None) -> list[BenchRow]:
    """B requests submitted together to an engine with max(batch_sizes) slots: B live slots decode
    together (pixels in: the vision tower runs every time, no feature cache)."""
    cfg = model.config
    dev = model.device
    engine = Engine(model, compile=compile, max_slots=max(batch_sizes), max_len=cfg.vision.num_image_tokens
                    + prompt_len + new_tokens)
    text = _prompt(cfg, prompt_len)
    S = cfg.vision.image_size
    rows = []
    for B in batch_sizes:
        pv = torch.rand(B, 1, 3, S, S, device=dev) * 2 - 1
        if log:
            log(f"palikit, {B} live slots: warm-up{' (compiling the step)' if compile else ''}, then {repeats} timed runs")

        timings: list[dict] = []

        def run(n):
            def go():
                gens = engine.generate([Request(text, pixel_values=pv[b]) for b in range(B)],
                                       GenerationOptions(n, ignore_eos=True))
                timings.append(gens[0].timings)
            return go

        _timed(run(1), dev, repeats)
        timings.clear()
        tn = _timed(run(new_tokens), dev, repeats)
        # the engine's own clocks: admission -> first token, and first token -> last / steps
        prefill = statistics.median(t["prefill_ms"] for t in timings[1:])
        step = statistics.median(t["decode_step_ms"] for t in timings[1:])
        rows.append(BenchRow("palikit (compiled)" if compile else "palikit", B, prefill, step, B / tn))
    engine.close()
    return rows


def bench_transformers(model, batch_sizes, new_tokens, prompt_len, repeats, log=None) -> list[BenchRow]:
    hf = hf_model_from(model)
    cfg = model.config
    dev = model.device
    text = _prompt(cfg, prompt_len)
    rows = []
    for B in batch_sizes:
        ids = torch.tensor([cfg.prompt_row(text)] * B, device=dev)
        pv = (torch.rand(B, 3, cfg.vision.image_size, cfg.vision.image_size, device=dev) * 2 - 1).to(model.dtype)
        if log:
            log(f"transformers generate, batch {B}: warm-up, then {repeats} timed runs")

        def run(n):
            def go():
                with torch.inference_mode():
                    hf.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                                token_type_ids=torch.zeros_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=cfg.pad_token_id)
            return go

        t1 = _timed(run(1), dev, repeats)
        tn = _timed(run(new_tokens), dev, repeats)
        rows.append(BenchRow("transformers", B, t1 * 1e3, (tn - t1) * 1e3 / max(new_tokens - 1, 1), B / tn))
    return rows


def speed_words(ratio: float, what: str = "") -> str:
    """A speed ratio (theirs / ours time, > 1 = we are faster) in words: "2.5x faster", "2.5x slower"
    (never "0.4x faster"), "about as fast" within 5 %; a non-positive or NaN ratio is timing noise."""
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or ratio <= 0:
        return "not measurable (a zero or negative time: timer noise; raise --new-tokens or --repeats)"
    if 1 / 1.05 <= ratio <= 1.05:
        return "about as fast" + (f" as {what}" if what else "")
    words = f"{ratio:.1f}x faster" if ratio > 1 else f"{1 / ratio:.1f}x slower"
    return words + (f" than {what}" if what else "")


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_cores(interval: float = 0.5) -> float | None:
    """CPUs in use over the next `interval` seconds, from /proc/stat (Linux; None elsewhere): what the
    machine is doing right now, where the load average also remembers the last minute's jobs."""
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def busy_warning(load_1m: float | None, cpus: int | None, threads: int, *, busy: float | None = None,
                 running: bool = False) -> str | None:
    """A warning when the machine is busier than the threads a benchmark uses allow. Before the run
    (`running=False`) other work holds `busy` CPUs (measured, `busy_cores`; else the 1-minute load
    average), so fewer than `threads` are free; after it (`running=True`: the load average includes the
    benchmark's own threads) more runnable threads than CPUs."""
    others = busy if busy is not None else load_1m
    if others is None or not cpus:
        return None
    if running:
        return None if others <= cpus + 0.5 else (
            f"the machine is busy: 1-minute load average {others:.1f} during the run on {cpus} CPUs, with "
            f"{threads} torch thread(s) here; the timings are slower and noisier than on a quiet machine "
            "(run it again when the machine is quiet)")
    if others + threads <= cpus + 0.5:
        return None
    free = max(1, cpus - math.ceil(others))
    load = f" (1-minute load average {load_1m:.1f})" if load_1m is not None else ""
    return (f"the machine is busy: {others:.1f} of {cpus} CPUs in use before the run{load}, with {threads} torch "
            f"thread(s) here; the timings are slower and noisier than on a quiet machine (--torch-threads {free}, or "
            "run it when the machine is quiet)")


def run_bench(config: PaliGemmaConfig, *, batch_sizes=(1, 4), new_tokens=32, prompt_len=16, repeats=3,
              device="cpu", dtype=torch.float32, compare_transformers=True, compile=False, log=None) -> dict:
    """`log(message)` is called before each phase (progress on a long run). With `compile`, the
    eager engine is timed too (compile_speedup: eager / compiled ms per decode step). The JSON records
    the CPU count, the load averages before and after the run and the CPUs in use just before it, and
    `warnings` when the machine was busier than the torch threads used allow (`busy_warning`)."""
    start, cpus, threads, busy = load_average(), os.cpu_count(), torch.get_num_threads(), busy_cores()
    warnings = [w for w in [busy_warning(start[0] if start else None, cpus, threads, busy=busy)] if w]
    if log and warnings:
        log(f"warning: {warnings[0]}")
    torch.manual_seed(0)
    model = random_model(config, device, dtype)
    rows = bench_palikit(model, batch_sizes, new_tokens, prompt_len, repeats, compile, log)
    eager_rows = bench_palikit(model, batch_sizes, new_tokens, prompt_len, repeats, False, log) if compile else []
    hf_rows: list[BenchRow] = []
    hf_error = None
    if compare_transformers:
        try:
            hf_rows = bench_transformers(model, batch_sizes, new_tokens, prompt_len, repeats, log)
        except ImportError:
            hf_error = "transformers not installed"
    ratios = {}
    for ours, theirs in zip(rows, hf_rows):
        ratios[str(ours.batch_size)] = {
            "decode_step_speedup": theirs.decode_step_ms / ours.decode_step_ms,
            "prefill_speedup": theirs.prefill_ms / ours.prefill_ms,
            "images_per_s_ratio": ours.images_per_s / theirs.images_per_s,
        }
    return {
        "model": config.name,
        "device": str(device) if torch.device(device).type != "cuda" else torch.cuda.get_device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": new_tokens,
        "prompt_tokens": config.vision.num_image_tokens + prompt_len,
        "torch": torch.__version__,
        "torch_threads": threads,
        "cpu_count": cpus,
        "load_average": {"start": start, "end": (end := load_average())},  # 1, 5, 15 min
        "cpus_busy_before": busy,  # CPUs in use over 0.5 s just before the run (/proc/stat)
        "warnings": warnings + [w for w in [busy_warning(end[0] if end else None, cpus, threads, running=True)] if w],
        "rows": [asdict(r) for r in rows + eager_rows + hf_rows],
        "speedup_vs_transformers": ratios,
        **({"compile_speedup": {str(c.batch_size): e.decode_step_ms / c.decode_step_ms
                                for c, e in zip(rows, eager_rows)}} if eager_rows else {}),
        **({"transformers_error": hf_error} if hf_error else {}),
    }
