"""Multi-LoRA serving benchmark (`palikit bench-serve --adapters N`, issue 34): the mixed trace of
`bench/serve.py` spread over N adapters, in one run, three ways on the same weights:

  (m) multi-LoRA: N adapters in the engine's device slots, every request on its own adapter, all
      batched together (`PaliGemma.load_adapter`, `adapter=`);
  (base) the same trace on the base model alone (no adapter): what (m) should come close to;
  (swap) one merged model at a time, what a server without multi-LoRA does with N fine-tunes and
      one copy of the model: the oldest waiting request's adapter is merged into the weights (W +=
      scale * B @ A for each of its modules, from CPU copies read once before the clock starts), up
      to `slots` of the requests of that adapter that have arrived run as one batch on the same
      continuous engine until all have finished (requests of other adapters wait: a batch never
      mixes adapters), then the next oldest waiting request's adapter; the base weights are
      restored from a saved copy before a different adapter is merged (not when the next batch is
      for the same adapter). So it pays what swapping really costs (merge + restore at each switch,
      image features recomputed after a tower adapter changes the tower, short batches when few
      requests of one adapter are waiting, a batch's rows idle while its longest answer finishes)
      and nothing else (no disk reads, no recompiles, no new process).

Requests arrive open-loop (Poisson at `rate`, above capacity by default, so throughput is capacity);
throughput = completed requests / (last completion - first arrival). The adapters are random (rank 8
and 16, decoder-only and decoder + vision tower), written in PEFT's on-disk format and read back by
the real loader. (m) and (swap) must give the same answers (greedy): `agree` counts them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .serve import hardware, image_pool, make_trace

TARGETS = {"vs_base": 0.7, "vs_swap": 3.0}


def write_random_adapter(model, folder: Path, *, r: int, tower: bool, seed: int, std: float = 0.02) -> Path:
    """A PEFT-format LoRA adapter of `model` with random A and B (all decoder Linears; the vision tower
    and projector too when `tower`)."""
    from safetensors.torch import save_file

    from ..model.lora import default_targets
    from ..weights.adapter import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, hf_module_name

    g = torch.Generator().manual_seed(seed)
    own = dict(model.named_modules())
    names = [n for n in default_targets(model) if tower or n.startswith("language_model.")]
    tensors = {}
    for n in names:
        m = own[n]
        key = f"{PEFT_PREFIX}{hf_module_name(n)}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * std
        tensors[f"{key}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                  "lora_dropout": 0.0, "bias": "none",
                                                  "target_modules": sorted(hf_module_name(n) for n in names)}))
    return folder


def _submit_at(pg, trace, pool, adapters, t0) -> list:
    pending = []
    for r in trace:
        delay = t0 + r.arrival_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pending.append(pg.submit(pool[r.image].image, r.prompt, max_new_tokens=r.max_new_tokens,
                                 adapter=adapters[r.index]))
    return pending


def run_batched(pg, trace, pool, adapters) -> dict:
    """(m) or (base): the open-loop trace on the continuous engine, each request on its adapter."""
    t0 = time.perf_counter() + 0.02
    results = [p.result() for p in _submit_at(pg, trace, pool, adapters, t0)]
    return _summary(t0, results, time.perf_counter())


def run_swapping(pg, trace, pool, adapters, folders, slots: int) -> dict:
    """(swap): one merged adapter at a time (module docstring): a batch is up to `slots` arrived
    requests of the oldest waiting request's adapter, run to completion on the continuous engine;
    the adapter is merged before its batch (unless it is the one already merged) and the base
    weights restored before the next adapter's; the adapters are read from disk once, before the
    clock starts (a server keeps its fine-tunes in CPU memory, as the multi-LoRA run does)."""
    from ..weights.adapter import read_adapter

    own = dict(pg.model.named_modules())
    cached = {name: read_adapter(folder) for name, folder in folders.items()}
    saved: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter() + 0.02
    results: list = [None] * len(trace)
    todo = list(trace)
    swaps, merged = 0, None
    while todo:
        now = time.perf_counter() - t0
        if todo[0].arrival_s > now:
            time.sleep(todo[0].arrival_s - now)
            continue
        name = adapters[todo[0].index]
        group = [r for r in todo if r.arrival_s <= now and adapters[r.index] == name][:slots]
        if name != merged:
            _restore(own, saved)  # (the feature cache drops itself when the tower's weights change)
            if name is not None:
                cfg, layers = cached[name]
                _merge(own, layers, float(cfg["lora_alpha"]) / int(cfg["r"]), saved)
                swaps += 1
            merged = name
        pend = [pg.submit(pool[r.image].image, r.prompt, max_new_tokens=r.max_new_tokens) for r in group]
        for r, p in zip(group, pend):
            results[r.index] = p.result()
        done = {r.index for r in group}
        todo = [r for r in todo if r.index not in done]
    _restore(own, saved)
    out = _summary(t0, results, time.perf_counter())
    out["swaps"] = swaps
    return out


@torch.no_grad()
def _merge(own, layers, scale, saved) -> None:
    for name, d in layers.items():
        w = own[name].weight
        saved[name] = w.detach().clone()
        w.add_((d["lora_B"].float() @ d["lora_A"].float() * scale).to(w.dtype))


@torch.no_grad()
def _restore(own, saved) -> None:
    for name, w in saved.items():
        own[name].weight.copy_(w)
    saved.clear()


def _summary(t0, results, t_end) -> dict:
    tokens = sum(len(r.tokens) for r in results)
    seconds = t_end - t0
    return {"requests": len(results), "tokens": tokens, "seconds": seconds, "req_per_s": len(results) / seconds,
            "tokens_per_s": tokens / seconds, "answers": [r.tokens for r in results]}


def parse_ranks(text: str) -> tuple[int, ...]:
    """`--lora-ranks 8,16` -> (8, 16)."""
    try:
        ranks = tuple(int(r) for r in text.split(","))
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--lora-ranks must be positive integers separated by commas, e.g. 8,16; got {text!r}")
    return ranks


def run_lora_bench(pg, *, n_adapters: int = 8, n_requests: int = 480, rate: float = 120.0, seed: int = 0,
                   slots: int = 16, max_new_tokens: dict | None = None, ranks: tuple[int, ...] = (8, 16)) -> dict:
    """The three runs on one trace (see the module docstring); the report with ratios and targets.
    Adapter i has rank ranks[i % len(ranks)]; every fourth one targets the vision tower too."""
    if n_adapters < 1:
        raise ValueError(f"--adapters must be >= 1, got {n_adapters}")
    pool = image_pool(32, pg.model.config.vision.image_size)
    trace = make_trace(pool, n_requests, rate, seed, None, max_new_tokens)
    names = [f"lora{i}" for i in range(n_adapters)]
    adapters = {r.index: names[r.index % n_adapters] for r in trace}
    root = Path(tempfile.mkdtemp(prefix="palikit-bench-lora-"))
    try:  # the adapter folders go when the runs end (the engine keeps its CPU copies)
        folders = {n: write_random_adapter(pg.model, root / n, r=ranks[i % len(ranks)], tower=i % 4 == 3, seed=i)
                   for i, n in enumerate(names)}
        pg.configure_scheduler(max_slots=slots)
        warm = trace[:4]
        run_batched(pg, warm, pool, {r.index: None for r in warm})
        swap = run_swapping(pg, trace, pool, adapters, folders, slots)
        base = run_batched(pg, trace, pool, {r.index: None for r in trace})
        pg.enable_adapters(max_loras=n_adapters, max_lora_rank=max(ranks))
        for n, f in folders.items():
            pg.load_adapter(n, f)
        run_batched(pg, warm, pool, {r.index: names[0] for r in warm})
        multi = run_batched(pg, trace, pool, adapters)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    agree = sum(a == b for a, b in zip(multi.pop("answers"), swap.pop("answers")))
    base.pop("answers")
    report = {"model": pg.name, "hardware": hardware(pg), "adapters": n_adapters, "ranks": list(ranks),
              "requests": len(trace),
              "rate_per_s": rate, "slots": slots, "multi_lora": multi, "base": base, "swap_merged": swap,
              "multi_vs_base": multi["req_per_s"] / base["req_per_s"],
              "multi_vs_swap": multi["req_per_s"] / swap["req_per_s"],
              "base_vs_swap": base["req_per_s"] / swap["req_per_s"],  # the most multi_vs_swap can be (multi <= base)
              # in tokens/s too: a random model's answers change length with its adapter (random weights)
              "multi_vs_base_tokens": multi["tokens_per_s"] / base["tokens_per_s"],
              "agree_multi_swap": agree}
    report["targets"] = {"multi_vs_base >= 0.7": report["multi_vs_base"] >= TARGETS["vs_base"],
                         "multi_vs_swap >= 3": report["multi_vs_swap"] >= TARGETS["vs_swap"]}
    return report


def format_lora_report(rep: dict) -> str:
    hw = rep["hardware"]
    lines = [f"multi-LoRA serving: {rep['model']} on {hw['device']} ({hw['cpu']}, {hw['torch_threads']} threads), "
             f"{rep['requests']} requests at {rep['rate_per_s']:g}/s over {rep['adapters']} adapters (ranks "
             f"{'/'.join(map(str, rep['ranks']))}), "
             f"{rep['slots']} slots", "| run | req/s | tokens/s | seconds |", "|---|---|---|---|"]
    for key, label in (("multi_lora", f"multi-LoRA ({rep['adapters']} adapters, one batch)"),
                       ("base", "base model alone"),
                       ("swap_merged", f"swap merged adapters per batch ({rep['swap_merged']['swaps']} swaps)")):
        r = rep[key]
        lines.append(f"| {label} | {r['req_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} |")
    lines.append(f"multi-LoRA vs base: {rep['multi_vs_base']:.2f}x (target >= 0.7; in tokens/s "
                 f"{rep['multi_vs_base_tokens']:.2f}x); vs swapping: "
                 f"{rep['multi_vs_swap']:.2f}x (target >= 3); answers equal to the merged model's: "
                 f"{rep['agree_multi_swap']}/{rep['requests']}; base vs swapping (the most multi-LoRA can reach "
                 f"against swapping on this trace): {rep['base_vs_swap']:.2f}x")
    return "\n".join(lines)
