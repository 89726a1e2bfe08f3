"""Constraint overhead (`palikit bench --constrained`): ms per decode step of a full slot batch of
detect (or segment) requests on the bundled demo model, raw against constrained (tasks/constrain.py's
grammar on every row), in one run, alternating, median of the repeats.

Every row runs exactly `new_tokens` steps (EOS ignored) so both sides time the same number of
steps with every slot live; the constrained rows use the grammar without its EOS choice, so they
stay inside the grammar (locs, segs, labels, separators) for every step: the grammar's worst case,
not a row that ended early. The step time includes everything the scheduler does per step (the
rows' `advance` and next mask, the masked selection). The demo model is tiny (a decode step is a
few ms), so this is where a per-row Python cost shows most; a full-size model's step is 100x longer.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from ..runtime import cpu_model

__all__ = ["run_constrained_bench"]


class _WithoutEos:
    """A grammar cursor that never offers EOS (so a row stays in the grammar for the whole run)."""

    def __init__(self, cursor, eos_id: int):
        self.cursor, self.eos = cursor, eos_id
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def allowed(self) -> torch.Tensor:
        ids = self.cursor.allowed()
        key = (ids.data_ptr(), ids.numel())
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = ids[ids != self.eos]
        return hit

    def advance(self, token_id: int) -> None:
        self.cursor.advance(token_id)


def _rows(pg, task: str, n: int):
    """(pixels, key, prompt, labels) of the first `n` `task` rows of the demo test split."""
    from ..demo import shapes
    from ..demo.splits import write_split
    from ..engine.features import pixel_key

    folder = Path(tempfile.mkdtemp(prefix="palikit-bench-constrained-"))
    data = write_split(shapes, folder, "test", 4 * n, pg.processor.size, seg_fn=lambda s: [0] * 16)
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["task"] == task][:n]
    out = []
    for r in rows:
        pv = pg.processor([str(data / r["image"])])[0][None]  # [1, 3, S, S]
        labels = r["prefix"].split(" ", 1)[1].split(" ; ")
        out.append((pv, pixel_key(pv), r["prefix"], labels))
    return out


def _one_run(pg, rows, constrained: bool, new_tokens: int) -> float:
    """ms per decode step with every row live: (last done - first token) / (new_tokens - 1)."""
    from ..engine import GenerationOptions, Request
    from ..tasks.constrain import grammar_for_prompt

    opts = GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True)
    tickets = []
    for pv, key, prompt, labels in rows:
        req = Request(pg.encode_prompt(prompt), pixel_values=pv, pixel_key=key)
        if constrained:
            g = grammar_for_prompt(pg.tokenizer, prompt, labels)
            req.constraint = _WithoutEos(g.start(), pg.tokenizer.eos_id)
        tickets.append(pg.engine.submit(req, opts))
    for t in tickets:
        t.result(timeout=600)
    first = min(t.t_first_token for t in tickets)
    last = max(t.t_done for t in tickets)
    return (last - first) * 1e3 / (new_tokens - 1)


def run_constrained_bench(model: str | None = None, *, task: str = "detect", slots: int = 16, new_tokens: int = 64,
                          repeats: int = 5, threads: int = 0, log=print) -> dict:
    """Raw vs constrained ms per decode step of `slots` rows decoding together; one JSON-able dict."""
    from ..api import PaliGemma
    from ..assets import default_model
    from .inference import busy_cores, load_average

    if threads > 0:
        torch.set_num_threads(threads)
    pg = PaliGemma.from_pretrained(default_model(model), device="cpu", dtype="float32")
    pg.configure_scheduler(max_slots=slots)
    rows = _rows(pg, task, slots)
    if len(rows) < slots:
        raise ValueError(f"only {len(rows)} {task} rows for {slots} slots")
    busy, load_before = busy_cores(), load_average()
    times: dict[str, list[float]] = {"raw": [], "constrained": []}
    _one_run(pg, rows, False, 8), _one_run(pg, rows, True, 8)  # warm-up: caches, allocations, grammars
    for i in range(repeats):
        for mode in ("raw", "constrained") if i % 2 == 0 else ("constrained", "raw"):
            times[mode].append(_one_run(pg, rows, mode == "constrained", new_tokens))
            log(f"{mode}: {times[mode][-1]:.3f} ms / step")
    raw, con = statistics.median(times["raw"]), statistics.median(times["constrained"])
    return {"bench": "constrained", "model": pg.name, "task": task, "slots": slots, "new_tokens": new_tokens,
            "repeats": repeats, "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
            "cpus_busy_before": busy, "load_before": load_before, "load_after": load_average(),
            "raw_ms_per_step": raw, "constrained_ms_per_step": con, "overhead_pct": (con / raw - 1) * 100,
            "raw_runs": times["raw"], "constrained_runs": times["constrained"]}
