"""Serving benchmark: replays one seeded, mixed, OPEN-LOOP trace (Poisson arrivals at a given rate;
short OCR / counting / colour answers, captions, long segmentation outputs) against the serving
backends of `serve_backends` in one run, and reports per backend requests/s, generated tokens/s,
p50/p99 latency (all requests and the short class), time to first token p50/p99 and requests
lost or failed; plus the short class replayed ALONE (same arrival times, nothing else) on the
batching backends, a streamed-vs-plain time-per-token check, and pass/fail against the targets of
issue 14. The last line printed is one JSON object with every figure.

    palikit bench-serve                                     # bundled demo model, CPU
    palikit bench-serve --model pg1-3b-224 --device cuda    # random full-size weights

Latency and time to first token count from each request's SCHEDULED arrival (open loop: a late
submitter or a full queue cannot hide waiting). Throughput = completed requests (tokens) divided by
the time from the trace's start to the last completion, so it measures a backend's capacity only
when the backend falls behind the offered rate (`saturated`); the default 120/s is more than either
batching backend sustained with the demo model on 2 CPU cores, and the throughput target says when
the offered rate, not the backend, capped (a). Every backend returns tokens and text only: task
parsing (boxes, mask decoding) is left out of all of them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..testing import random_paligemma
from .serve_backends import BACKENDS, ContinuousBackend

CLASSES = ("short", "caption", "long")
DEFAULT_MIX = {"short": 0.5, "caption": 0.3, "long": 0.2}
# One budget for every request, as a client that sets max_tokens once: run-to-completion batching
# (which groups requests with identical options) then mixes short and long answers in a batch, the
# traffic continuous batching is for. Per-class budgets (`--max-new-tokens short=16,caption=32,long=256`)
# sort the traffic by length for (b): the README reports both.
MAX_NEW_TOKENS = {"short": 256, "caption": 256, "long": 256}
LONG_PROMPT = "segment circle ; square ; triangle"  # the demo model's longest answers (masks for every shape)
TARGETS = {"short_p99_ratio": 3.0, "throughput_ratio": 2.0, "stream_ratio": 1.2}


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float  # from the trace's start
    cls: str  # "short" | "caption" | "long"
    task: str  # ocr / count / color / caption / segment
    image: int  # index into the image pool
    prompt: str
    max_new_tokens: int


# ----------------------------------------------------------------------------------------- the trace
def image_pool(n: int, size: int) -> list:
    """`n` images of the demo data's held-out test split at the model's size (shapes, some words)."""
    from ..demo.shapes import SPLIT_SEEDS, make_sample

    return [make_sample(i, seed=SPLIT_SEEDS["test"], size=size) for i in range(n)]


def _prompt_for(sample, cls: str, rng: random.Random) -> tuple[str, str]:
    from ..demo.shapes import CLASSES as SHAPES
    from ..demo.shapes import PLURALS

    if cls == "caption":
        return "caption", "caption en"
    if cls == "long":
        return "segment", LONG_PROMPT
    present = sorted({s.cls for s in sample.shapes})
    singles = [c for c in present if sum(s.cls == c for s in sample.shapes) == 1]
    tasks = ["count"] + (["ocr"] if sample.word else []) + (["color"] if singles else [])
    task = rng.choice(tasks)
    if task == "ocr":
        return task, "ocr"
    if task == "color":
        return task, f"answer en what color is the {rng.choice(singles)}"
    return task, f"answer en how many {PLURALS[rng.choice(SHAPES)]} are there"


def make_trace(pool: list, n: int, rate: float, seed: int = 0, mix: dict | None = None,
               max_new_tokens: dict | None = None) -> list[TraceRequest]:
    """`n` requests with exponential inter-arrival gaps (Poisson, `rate` per second), classes drawn by
    `mix`; the same arguments always give the same trace."""
    if n < 1 or rate <= 0:
        raise ValueError(f"need at least 1 request and a positive rate (got {n} requests at {rate}/s)")
    mix = mix or DEFAULT_MIX
    budgets = {**MAX_NEW_TOKENS, **(max_new_tokens or {})}
    if set(mix) - set(CLASSES) or not any(w > 0 for w in mix.values()) or min(mix.values()) < 0:
        raise ValueError(f"mix must give non-negative weights to {', '.join(CLASSES)}; got {mix}")
    rng = random.Random(seed)
    classes, weights = zip(*mix.items())
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        cls = rng.choices(classes, weights)[0]
        img = rng.randrange(len(pool))
        task, prompt = _prompt_for(pool[img], cls, rng)
        out.append(TraceRequest(i, t, cls, task, img, prompt, budgets[cls]))
    return out


# ----------------------------------------------------------------------------------------- replay
def replay(backend, trace: list[TraceRequest], pool: list, *, timeout_s: float, progress=None) -> dict:
    """Submit every request at its arrival time (open loop), then wait for all; returns the records."""
    t0 = time.perf_counter() + 0.02
    handles = []
    for r in trace:
        delay = t0 + r.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handles.append(backend.submit(r.index, pool[r.image].image, r.prompt, {"max_new_tokens": r.max_new_tokens}))
    deadline = time.perf_counter() + timeout_s
    task = progress.add_task(backend.label, total=len(trace)) if progress is not None else None
    records = []
    for r, h in zip(trace, handles):
        done = h.wait(max(0.0, deadline - time.perf_counter()))
        status = "lost" if not done else ("failed" if h.error else "ok")
        records.append({"index": r.index, "cls": r.cls, "task": r.task, "status": status,
                        "scheduled": t0 + r.arrival_s, "t_submit": h.t_submit, "t_first_token": h.t_first_token,
                        "t_done": h.t_done, "n_tokens": len(h.tokens), "text": h.text, "error": h.error})
        if task is not None:
            progress.advance(task)
    return {"t0": t0, "records": records}


def _pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def _backlog_growth(ok: list[dict]) -> float | None:
    """Median latency of the last quarter of arrivals over the first quarter's: a queue that keeps
    growing (the backend cannot keep up with the offered rate) makes it large."""
    if len(ok) < 8:
        return None
    lat = [r["t_done"] - r["scheduled"] for r in sorted(ok, key=lambda r: r["scheduled"])]
    q = len(lat) // 4
    return float(np.median(lat[-q:]) / max(np.median(lat[:q]), 1e-9))


def summarize(run: dict) -> dict:
    """Throughput, latency and time-to-first-token figures of one replay (seconds); `saturated` when
    requests arriving late waited more than twice as long as the first ones (a growing queue)."""
    recs, t0 = run["records"], run["t0"]
    ok = [r for r in recs if r["status"] == "ok"]
    end = max((r["t_done"] for r in ok), default=t0)
    span = max(end - t0, 1e-9)
    lat = [r["t_done"] - r["scheduled"] for r in ok]
    short = [r["t_done"] - r["scheduled"] for r in ok if r["cls"] == "short"]
    ttft = [r["t_first_token"] - r["scheduled"] for r in ok]
    rps = len(ok) / span
    out = {
        "requests": len(recs), "completed": len(ok),
        "failed": sum(r["status"] == "failed" for r in recs), "lost": sum(r["status"] == "lost" for r in recs),
        "span_s": span, "requests_per_s": rps, "tokens_per_s": sum(r["n_tokens"] for r in ok) / span,
        "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
        "short_latency_p50_s": _pct(short, 50), "short_latency_p99_s": _pct(short, 99),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "max_submit_lag_s": max((r["t_submit"] - r["scheduled"] for r in recs), default=0.0),
        "backlog_growth": (growth := _backlog_growth(ok)),
        "saturated": bool(growth is not None and growth > 2.0),
        "mean_tokens": {c: float(np.mean(n)) if (n := [r["n_tokens"] for r in ok if r["cls"] == c]) else None
                        for c in CLASSES},
        "errors": sorted({r["error"] for r in recs if r["error"]})[:3],
    }
    return out


# ----------------------------------------------------------------------------------------- streaming
def stream_check(pg, image, prompt: str, max_new_tokens: int, repeats: int = 7) -> dict:
    """Seconds per generated token of one request streamed vs not, alone, on the continuous scheduler
    when the build has it, else on today's `PaliGemma.stream`. Runs alternate plain / streamed; the
    ratio is the median over those back-to-back pairs (each pair sees the same machine load, which
    matters on a shared machine); per-token times are medians."""
    scheduler = ContinuousBackend.available(pg)

    def plain():
        if scheduler:
            p = pg.submit(image, prompt, max_new_tokens=max_new_tokens, constrained=False)
            r = p.result()
            return p.t_done - p.t_submit, r.text, len(r.tokens)
        t = time.perf_counter()
        r = pg.predict(image, prompt, max_new_tokens=max_new_tokens, constrained=False)
        return time.perf_counter() - t, r.text, len(r.tokens)

    def streamed():
        pieces: list[str] = []
        if scheduler:
            p = pg.submit(image, prompt, on_text=pieces.append, max_new_tokens=max_new_tokens, constrained=False)
            p.result()
            return p.t_done - p.t_submit, "".join(pieces)
        t = time.perf_counter()
        pieces = list(pg.stream(image, prompt, max_new_tokens=max_new_tokens, constrained=False))
        return time.perf_counter() - t, "".join(pieces)

    plain(), streamed()  # warm-up
    p_times, s_times, text_equal, n = [], [], True, 1
    for _ in range(repeats):
        dt, text, n = plain()
        sdt, stext = streamed()
        p_times.append(dt)
        s_times.append(sdt)
        text_equal &= stext == text
    n = max(n, 1)
    per_plain, per_stream = float(np.median(p_times)) / n, float(np.median(s_times)) / n
    ratio = float(np.median([st / pt for pt, st in zip(p_times, s_times)]))
    impl = ("continuous scheduler (on_text)" if scheduler else
            "PaliGemma.stream vs PaliGemma.predict, which also parses boxes and masks (no scheduler in this build)")
    return {"impl": impl,
            "prompt": prompt, "tokens": n, "repeats": repeats, "plain_s_per_token": per_plain,
            "stream_s_per_token": per_stream, "ratio": ratio, "best_ratio": min(s_times) / min(p_times),
            "stream_text_equal": text_equal}


# ----------------------------------------------------------------------------------------- the run
def hardware(pg) -> dict:
    from ..runtime import cpu_model

    cpu = cpu_model()
    dev = pg.device
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
            "dtype": str(pg.model.dtype).removeprefix("torch."),
            "torch": torch.__version__, "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _warm_up(backend, pool, budgets: dict) -> None:
    """One short and one long request (allocations, first-call costs), not counted."""
    hs = [backend.submit(-1, pool[0].image, "ocr", {"max_new_tokens": budgets["short"]}),
          backend.submit(-2, pool[0].image, LONG_PROMPT, {"max_new_tokens": budgets["long"]})]
    for h in hs:
        if not h.wait(600) or h.error:
            raise RuntimeError(f"{backend.label}: warm-up request failed: {h.error or 'no answer in 600 s'}")


def _agreement(runs: dict, ref: str = "b") -> dict:
    """How many answers each backend's mixed run shares with backend (b)'s (greedy: they should all)."""
    if ref not in runs:
        return {}
    ref_text = {r["index"]: r["text"] for r in runs[ref]["mixed"]["records"] if r["status"] == "ok"}
    return {k: sum(ref_text.get(r["index"]) == r["text"] for r in run["mixed"]["records"] if r["status"] == "ok")
            for k, run in runs.items() if k != ref}


def _replay_all(pg, backends, trace, short_trace, pool, budgets, slots, timeout_s, progress) -> dict:
    """Each backend in turn: warm-up, the mixed trace, then (a) and (b) the short class alone."""
    from rich.progress import Progress

    runs: dict[str, dict] = {}
    with Progress(transient=True, disable=not progress, console=_stderr_console()) as bar:
        for key in backends:
            backend = BACKENDS[key](pg, slots) if key != "c" else BACKENDS[key](pg)
            try:
                _warm_up(backend, pool, budgets)
                first = len(getattr(backend, "batches", ()))
                runs[key] = {"label": backend.label, "impl": backend.impl,
                             "mixed": replay(backend, trace, pool, timeout_s=timeout_s, progress=bar)}
                if hasattr(backend, "batches"):  # the mixed run's batch sizes
                    runs[key]["batch_sizes"] = list(backend.batches[first:])
                if key in "ab" and short_trace:
                    runs[key]["alone"] = replay(backend, short_trace, pool, timeout_s=timeout_s, progress=bar)
            finally:
                backend.close()
    return runs


def _entry(run: dict) -> dict:
    entry = {"label": run["label"], "impl": run["impl"], "mixed": summarize(run["mixed"])}
    if "alone" in run:
        entry["short_alone"] = alone = summarize(run["alone"])
        mixed_p99, alone_p99 = entry["mixed"]["short_latency_p99_s"], alone["short_latency_p99_s"]
        entry["short_p99_mixed_vs_alone"] = mixed_p99 / alone_p99 if mixed_p99 and alone_p99 else None
    if "batch_sizes" in run:
        entry["mean_batch_size"] = float(np.mean(run["batch_sizes"])) if run["batch_sizes"] else None
    return entry


def check_options(*, n_requests: int, rate: float, slots: int, timeout_s: float, backends: str,
                  max_new_tokens: dict | None) -> None:
    """ValueError, naming the option, for what `run_serve_bench` cannot run (checked before a model loads)."""
    if set(backends) - set(BACKENDS) or not backends:
        raise ValueError(f"backends must be letters among a, b, c; got {backends!r}")
    if n_requests < 1 or rate <= 0 or slots < 1 or timeout_s <= 0:
        raise ValueError("--requests, --rate, --slots and --timeout must be positive")
    if max_new_tokens and min(max_new_tokens.values()) < 1:
        raise ValueError(f"--max-new-tokens must be >= 1 per class; got {max_new_tokens}")


def run_serve_bench(pg, *, n_requests: int = 480, rate: float = 120.0, seed: int = 0, slots: int = 16,
                    mix: dict | None = None, backends: str = "abc", n_images: int = 32, timeout_s: float = 600.0,
                    stream: bool = True, max_new_tokens: dict | None = None, progress: bool = True,
                    keep_records: bool = False) -> dict:
    """Replay one trace against each backend in `backends` ("a", "b", "c"), the short class alone on
    (a) and (b), and the streaming check; returns the report (see `format_report`), with every
    request's stamps and text under "records" when `keep_records`."""
    check_options(n_requests=n_requests, rate=rate, slots=slots, timeout_s=timeout_s, backends=backends,
                  max_new_tokens=max_new_tokens)
    skipped = {}
    if "a" in backends and not ContinuousBackend.available(pg):
        skipped["a"] = "this build's PaliGemma has no continuous scheduler (submit / configure_scheduler)"
        backends = backends.replace("a", "")
    pool = image_pool(n_images, pg.model.config.vision.image_size)
    trace = make_trace(pool, n_requests, rate, seed, mix, max_new_tokens)
    budgets = {**MAX_NEW_TOKENS, **(max_new_tokens or {})}
    short_trace = [r for r in trace if r.cls == "short"]
    offered = len(trace) / trace[-1].arrival_s
    runs = _replay_all(pg, backends, trace, short_trace, pool, budgets, slots, timeout_s, progress)
    report = {"model": pg.name, "hardware": hardware(pg),
              "trace": {"requests": len(trace), "rate_per_s": rate, "offered_per_s": offered, "seed": seed,
                        "slots": slots, "mix": mix or DEFAULT_MIX, "max_new_tokens": budgets,
                        "classes": {c: sum(r.cls == c for r in trace) for c in CLASSES},
                        "short_alone_requests": len(short_trace), "images": n_images},
              "skipped": skipped, "agree_with_b": _agreement(runs)}
    report["backends"] = {key: _entry(run) for key, run in runs.items()}
    if stream:
        longest = max((r for run in runs.values() for r in run["mixed"]["records"]
                       if r["cls"] == "long" and r["status"] == "ok"), key=lambda r: r["n_tokens"], default=None)
        image = pool[trace[longest["index"]].image if longest else 0].image
        report["stream"] = stream_check(pg, image, LONG_PROMPT, report["trace"]["max_new_tokens"]["long"])
    report["targets"] = targets(report)
    if keep_records:
        report["records"] = {k: {phase: run[phase]["records"] for phase in ("mixed", "alone") if phase in run}
                             for k, run in runs.items()}
        report["trace_requests"] = [vars(r) for r in trace]
    return report


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def targets(report: dict) -> dict:
    """Issue 14's pass/fail lines; `pass` is None when the figure could not be measured."""
    b = report["backends"]
    a, rb = b.get("a"), b.get("b")
    out = {}
    ratio = a.get("short_p99_mixed_vs_alone") if a else None
    out["short_p99_mixed_vs_alone"] = {"value": ratio, "target": f"<= {TARGETS['short_p99_ratio']}x",
                                       "pass": None if ratio is None else ratio <= TARGETS["short_p99_ratio"]}
    thr = p99_ok = None
    if a and rb:
        thr = a["mixed"]["requests_per_s"] / rb["mixed"]["requests_per_s"]
        p99_ok = a["mixed"]["latency_p99_s"] <= rb["mixed"]["latency_p99_s"]
    out["throughput_vs_b"] = {"value": thr, "p99_not_worse": p99_ok,
                              "target": f">= {TARGETS['throughput_ratio']}x (b) at equal or better p99",
                              "pass": None if thr is None else bool(thr >= TARGETS["throughput_ratio"] and p99_ok)}
    if thr is not None and not a["mixed"]["saturated"] and thr < TARGETS["throughput_ratio"]:
        need = TARGETS["throughput_ratio"] * rb["mixed"]["requests_per_s"]
        out["throughput_vs_b"]["note"] = (f"(a) kept up with the offered {report['trace']['offered_per_s']:.0f}/s: "
                                          f"rerun with --rate above {need:.0f} to measure its capacity")
    runs = [s for e in b.values() for s in (e["mixed"], e.get("short_alone")) if s]
    lost = sum(s["lost"] + s["failed"] for s in runs)
    out["nothing_lost"] = {"value": lost, "target": "0 lost or failed", "pass": lost == 0 if runs else None}
    st = report.get("stream")
    out["stream_vs_plain"] = {"value": st["ratio"] if st else None, "target": f"<= {TARGETS['stream_ratio']}x",
                              "impl": st["impl"] if st else None,
                              "pass": None if not st else st["ratio"] <= TARGETS["stream_ratio"]}
    return out


# ----------------------------------------------------------------------------------------- report
def _f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _row(name: str, s: dict) -> str:
    return (f"{name:<34}{_f(s['requests_per_s'], '.2f'):>7}{_f(s['tokens_per_s'], '.1f'):>8}"
            f"{_f(s['latency_p50_s']):>8}{_f(s['latency_p99_s']):>8}{_f(s['short_latency_p50_s']):>8}"
            f"{_f(s['short_latency_p99_s']):>8}{_f(s['ttft_p50_s']):>8}{_f(s['ttft_p99_s']):>8}"
            f"{s['lost']:>5}{s['failed']:>5}  {'yes' if s['saturated'] else 'no'}")


def format_report(report: dict) -> str:
    """The human-readable table (the JSON line is printed after it)."""
    hw, tr = report["hardware"], report["trace"]
    lines = [f"palikit serving benchmark: {report['model']} on {hw['device']} ({hw['dtype']}, torch {hw['torch']})",
             f"hardware: {hw['cpu']}; {hw['cpu_count']} logical CPUs, torch uses {hw['torch_threads']} threads "
             f"(+{hw['torch_interop_threads']} inter-op); 1-min load average at the end "
             f"{_f(hw['load_avg_1min'], '.2f')} (other processes share these CPUs when it exceeds the threads)",
             f"trace: {tr['requests']} requests, Poisson {tr['rate_per_s']:g}/s (offered {tr['offered_per_s']:.1f}/s), "
             f"seed {tr['seed']}, {tr['slots']} slots / max batch; classes "
             + ", ".join(f"{c} {n}" for c, n in tr["classes"].items())
             + "; max_new_tokens " + ", ".join(f"{c} {n}" for c, n in tr["max_new_tokens"].items()),
             "latency and TTFT in seconds from each request's scheduled arrival; sat = saturated (the last quarter "
             "of arrivals waited > 2x as long as the first: a growing queue)",
             "", f"{'backend':<34}{'req/s':>7}{'tok/s':>8}{'p50':>8}{'p99':>8}{'shrt50':>8}{'shrt99':>8}"
             f"{'ttft50':>8}{'ttft99':>8}{'lost':>5}{'fail':>5}  sat"]
    for key, e in report["backends"].items():
        lines.append(_row(e["label"], e["mixed"]))
        if "short_alone" in e:
            lines.append(_row("    short requests alone", e["short_alone"]))
    lines.append("")
    for key, e in report["backends"].items():
        mt = e["mixed"]["mean_tokens"]
        lines.append(f"{e['label']} [{e['impl']}]: mean output tokens " + ", ".join(f"{c} {_f(v, '.1f')}" for c, v in mt.items())
                     + (f"; mean batch {e['mean_batch_size']:.1f}" if e.get("mean_batch_size") else "")
                     + (f"; short p99 mixed / alone {e['short_p99_mixed_vs_alone']:.2f}x"
                        if e.get("short_p99_mixed_vs_alone") else "")
                     + f"; latest submit {e['mixed']['max_submit_lag_s'] * 1e3:.1f} ms after its arrival time"
                     + ("; errors: " + " | ".join(e["mixed"]["errors"]) if e["mixed"]["errors"] else ""))
    if "b" in report["backends"]:
        lines.append("(b) first token = its batch's end: run-to-completion batching yields nothing earlier")
    for key, why in report["skipped"].items():
        lines.append(f"({key}) not run: {why}")
    if report["agree_with_b"]:
        n_b = report["backends"]["b"]["mixed"]["completed"]
        lines.append("answers identical to (b)'s: "
                     + ", ".join(f"({k}) {v}/{n_b}" for k, v in report["agree_with_b"].items()))
    st = report.get("stream")
    if st:
        lines.append(f"stream ({st['impl']}): {st['tokens']} tokens of '{st['prompt']}', "
                     f"{st['stream_s_per_token'] * 1e3:.2f} ms/token streamed vs {st['plain_s_per_token'] * 1e3:.2f} "
                     f"plain: {st['ratio']:.2f}x (median of {st['repeats']} pairs; best runs {st['best_ratio']:.2f}x); "
                     f"streamed text equal: {st['stream_text_equal']}")
    lines.append("targets (issue 14, set for the CPU and the demo model):")
    for name, t in report["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        value = "not measured" if t["value"] is None else (str(t["value"]) if isinstance(t["value"], int)
                                                           else f"{t['value']:.2f}")
        lines.append(f"  [{verdict}] {name}: {value}"
                     f" (target {t['target']})" + (f" [{t['impl']}]" if t.get("impl") else "")
                     + ({True: "; p99 not worse than (b)'s", False: "; p99 worse than (b)'s"}
                        .get(t.get("p99_not_worse"), ""))
                     + (f"; {t['note']}" if t.get("note") else ""))
    return "\n".join(lines)


def load_pg(model: str | None, device: str = "auto", dtype: str = "auto", layers: int | None = None):
    """The bundled demo model (None), random weights of a preset's shape (`layers` decoder and tower
    layers at full width and with the full head: `bench.quant.shrink`), or a checkpoint folder / Hub id."""
    from ..api import PaliGemma
    from ..assets import default_model
    from ..config import PRESETS
    from ..runtime import resolve_device, resolve_dtype
    from ..weights.resolve import get_config
    from .quant import shrink

    if layers is not None and (layers < 1 or model not in PRESETS):
        raise ValueError(f"--layers {layers}: needs a preset --model (random weights, e.g. pg2-3b-224) and a count "
                         f">= 1; got --model {model or 'the demo model'}")
    if model in PRESETS:
        dev = resolve_device(device)
        return random_paligemma(shrink(get_config(model), layers), dev, resolve_dtype(dtype, dev))
    return PaliGemma.from_pretrained(default_model(model, hint="pass --model (a preset such as pg1-3b-224 for random "
                                                             "weights, or a checkpoint)"), device=device, dtype=dtype)


def parse_classes(text: str, what: str, cast) -> dict:
    """`short=0.5,caption=0.3` -> {"short": 0.5, "caption": 0.3} (`what`: the option, for the message)."""
    try:
        out = {k.strip(): cast(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise ValueError(f"{what} must look like short=0.5,caption=0.3,long=0.2; got {text!r}") from None
    if set(out) - set(CLASSES):
        raise ValueError(f"{what}: classes are {', '.join(CLASSES)}; got {', '.join(out)}")
    return out
