"""`palikit bench-serve`: the serving benchmark of `palikit.engine.serve_bench` (a mixed open-loop trace
against the continuous scheduler, run-to-completion batches and transformers; last stdout line JSON).
Its options are that module's (`palikit bench-serve --help`), so they live in one place."""

from __future__ import annotations

import typer

from . import app


@app.command("bench-serve", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_serve(ctx: typer.Context):
    """Serving benchmark: throughput, p50/p99 latency and time to first token under mixed traffic."""
    from ..engine.serve_bench import run_cli

    run_cli(list(ctx.args), prog="palikit bench-serve")
