"""`palikit eval`: accuracy, speed efficiency and cost efficiency of a model on a data set, beside
baselines (Tesseract, EasyOCR, RapidOCR, any OpenAI-compatible endpoint, another checkpoint, a COCO results file) run on
the same samples, with an optional prompt-sensitivity sweep; writes predictions JSONL, report.md/json
and PNG charts. Ctrl-C / SIGTERM keeps the predictions, writes the partial report, prints how to
resume and exits 130 / 143."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from . import app

BASELINE_HELP = ("Also run SPEC on the same samples (repeatable): tesseract[?psm=7&lang=eng] | "
                 "easyocr[?lang=en&model_dir=DIR&venv=PATH&threads=N] | rapidocr[?threads=N&det=1] | "
                 "openai:BASE_URL#MODEL[?key_env=OPENAI_API_KEY&prompts=chat|paligemma&concurrency=4&price_in=$/Mtok"
                 "&price_out=$/Mtok] | palikit:CHECKPOINT | coco-results:FILE (detect).")


def headline(r) -> str:
    """One line per model: the primary metric in percent, latency per image with the device, efficiencies."""
    med = r.speed.get("median_s")
    skipped = f", {len(r.skipped)} skipped" if r.skipped else ""
    parts = [f"{r.model}: {r.task} {r.primary} {r.score:.2f}% ({r.n} images, {r.failed} failed{skipped})"]
    if med is not None:
        parts.append(f"median {med:.4f} s/image on {r.hardware.get('device')}, "
                     f"speed efficiency {r.speed_efficiency:.2f} %/s")
    if r.metrics.get("negatives_fp_rate") is not None:
        parts.append(f"boxes for absent classes in {100 * r.metrics['negatives_fp_rate']:.1f}% of their queries")
    if r.cost_efficiency:
        parts.append(f"cost efficiency {r.cost_efficiency:,.0f} %/$ ({r.cost.get('price')})")
    return " | ".join(parts)


def exit_on_failures(reports, max_failed: int, ds) -> None:
    """Exit with status 1, the first reasons on stderr, when a model failed on more than `max_failed`
    samples (a missing image: the folder that holds them, if one is near)."""
    from ..eval.datasets import locate_images
    from ..eval.report import failure_lines

    over = [r for r in reports if r.failed > max_failed]
    if not over:
        return
    for r in over:
        print(f"palikit eval: {r.model}: {r.failed} of {r.n} samples failed (more than --max-failed {max_failed}); "
              "the first:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in failure_lines(r)), file=sys.stderr)
        found = locate_images(ds) if any(f["error"].startswith("image file not found") for f in r.failures) else None
        if found is not None:
            print(f"  the missing images are in {found}: pass --images {found}", file=sys.stderr)
    print("The report is written. Fix them and run the same command again (only the failed samples are predicted "
          "again), pass --skip-bad-rows to leave out samples whose image cannot be read, or raise --max-failed.",
          file=sys.stderr)
    raise SystemExit(1)


def sweep(pg, ds, task: str, out: Path, name: str, user_variants: dict, common: dict) -> None:
    """The prompt-sensitivity sweep in out/sensitivity, printed and linked from out/report.md."""
    from ..eval import evaluate_prompt_variants
    from ..eval.report import attach_section

    sens = evaluate_prompt_variants(pg, ds, task, out_dir=out / "sensitivity", model_name=name, user=user_variants,
                                    **common)
    attach_section(out, "sensitivity", sens.summary_lines("sensitivity"),
                   {"files": sens.files, "spread": sens.spread, "scores": sens.scores})
    typer.echo(sens.markdown())
    typer.echo(f"-> {out / 'sensitivity' / 'sensitivity.md'} (linked from {out / 'report.md'})")


@app.command("eval")
def evaluate(
    dataset: Path = typer.Argument(..., help="JSONL (ocr/vqa/anls/caption/count/exact) or COCO json (detect/segment)."),
    task: str = typer.Option(..., help="ocr | vqa | anls | caption | count | exact | detect | segment"),
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hub id (default: bundled demo)."),
    adapter: list[str] = typer.Option(None, "--adapter", help="LoRA adapter folder (PEFT format) merged into --model; "
                                      "or NAME=PATH (repeatable): each adapter evaluated unmerged on the same samples, "
                                      "one report row each beside the base model."),
    quantize: str = typer.Option(None, "--quantize", help="int8 or int4: quantize --model's weights at load."),
    baseline: list[str] = typer.Option(None, "--baseline", "-b", help=BASELINE_HELP),
    out: Path = typer.Option(Path("out/eval"), help="Output folder (predictions.jsonl, report.md, charts)."),
    images: Path = typer.Option(None, "--images", help="Folder the image paths are relative to (default: the data file's)."),
    skip_bad_rows: bool = typer.Option(False, help="Skip (and report) bad rows and samples whose image is missing "
                                                   "or unreadable, instead of stopping / counting them as failed."),
    negatives: int = typer.Option(0, help="detect/segment (COCO): also ask each image for N classes it does not "
                                          "hold; boxes for them are false positives (rate in the report)."),
    gallery: int = typer.Option(12, help="Draw the N worst predictions into worst.png, linked from report.md "
                                         "(0: none)."),
    max_failed: int = typer.Option(0, help="Exit with status 1 (the first reasons on stderr) when more samples than "
                                           "this fail (a missing image, a call that kept failing)."),
    batch_size: int = typer.Option(8),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    price_per_hour: float = typer.Option(None, help="Hardware $ per hour (self-hosted models and Tesseract)."),
    price_per_call: float = typer.Option(None, help="$ per call for --model (hosted), for cost efficiency."),
    compare_with: Path = typer.Option(None, help="Cached results (JSON/CSV) or a palikit report.json, side by side."),
    prompt: str = typer.Option(None, help="Prompt template overriding the task's, e.g. 'answer en {question}'."),
    limit: int = typer.Option(None, help="Only the first N samples."),
    sensitivity: bool = typer.Option(False, help="Also run the prompt-variant sweep (wording, case and separator "
                                                 "variants of the prompt) and report the spread."),
    variant: list[str] = typer.Option(None, "--variant", help="Another prompt for the sweep, 'TEMPLATE' or "
                                      "'NAME=TEMPLATE' (repeatable; implies --sensitivity), e.g. "
                                      "--variant 'detect {labels}'; fields as for --prompt."),
    fresh: bool = typer.Option(False, help="Ignore saved predictions instead of resuming."),
    progress: bool = typer.Option(True, help="Progress on stderr (a bar on a terminal, lines otherwise)."),
    max_new_tokens: int = typer.Option(64),
    constrained: bool = typer.Option(None, "--constrained/--raw", help="detect/segment: keep the output in the "
                                     "task's format with requested labels only (default: on for detect/segment "
                                     "prompts), or --raw for the model's own output. The sensitivity sweep runs both."),
    torch_threads: int = typer.Option(0, help="torch intra-op threads for --model (0 = torch's default; recorded "
                                              "in the report; 1 is fastest for tiny models on a busy machine)."),
):
    """Evaluate; an interrupted run resumes from the saved predictions (rerun the same command)."""
    from ..eval import evaluate as run_eval
    from ..eval.baselines import BaselineError, parse_baseline
    from ..eval.compare import evaluate_models
    from ..datafiles import DataError
    from ..eval.datasets import check_images, load_dataset
    from ..eval.prompts_variants import parse_user_variants
    from ..eval.runner import EvalInterrupted, check_template, sigterm_interrupts
    from .predict import load_model

    common = dict(batch_size=batch_size, price_per_hour=price_per_hour, price_per_call=price_per_call,
                  predict_options={"max_new_tokens": max_new_tokens,
                                   **({} if constrained is None else {"constrained": constrained})},
                  limit=limit, image_root=images,
                  strict=not skip_bad_rows, progress=progress, gallery=gallery)
    from .serve import split_adapters

    adapter, named = split_adapters(adapter or [])
    name = (model or "demo") + (f" + adapter {adapter}" if adapter else "") + (f" ({quantize})" if quantize else "")  # before/after rows tell apart
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        with sigterm_interrupts():
            # the data and the prompts first: a bad file, a wrong image folder or a bad template is said
            # before a model loads
            user_variants = parse_user_variants(variant or [])
            if prompt is not None:
                check_template(prompt)
            ds = check_images(load_dataset(dataset, task, image_root=images, strict=not skip_bad_rows,
                                           negatives=negatives), strict=not skip_bad_rows)
            pg = load_model(model, device, dtype, None, adapter=adapter, quantize=quantize)
            from ..eval.adapters import adapter_models

            views = adapter_models(pg, named)
            if baseline or views:
                others = [*views, *(parse_baseline(s, device=device, dtype=dtype) for s in baseline or ())]
                cmp = evaluate_models([pg, *others], ds, task, out_dir=out, resume=not fresh, prompt=prompt,
                                      compare_with=compare_with, names=[name, *[None] * len(others)],
                                      **common)
                reports = cmp.reports
                for r in cmp.reports:
                    typer.echo(headline(r))
                typer.echo(f"-> {out / 'report.md'}")
            else:
                report = run_eval(pg, ds, task, out_dir=out, resume=not fresh, prompt=prompt,
                                  compare_with=compare_with, model_name=name, **common)
                reports = [report]
                typer.echo(headline(report) + f" -> {out / 'report.md'}")
            if sensitivity or variant:
                sweep(pg, ds, task, out, name, user_variants, common)
    except EvalInterrupted as e:
        r = e.report
        what = "SIGTERM" if e.signum == 15 else "Ctrl-C"
        print(f"\n{what}: stopped {r.model} after {r.n} of {r.total} samples; the predictions made are kept in "
              f"{r.files.get('predictions')}"
              + (f" and the partial report is {Path(r.out_dir) / 'report.md'}" if r.n else " (none were made)")
              + ".\nResume: run the same command again (without --fresh); done samples are not predicted again.",
              file=sys.stderr)
        raise SystemExit(e.exit_code) from None  # not typer.Exit: cli.main drops its code (standalone_mode=False)
    except KeyboardInterrupt as e:  # before the first prediction (loading the model, reading the data)
        signum = getattr(e, "signum", 2)
        print(f"\n{'SIGTERM' if signum == 15 else 'Ctrl-C'}: stopped before any prediction; nothing to resume.",
              file=sys.stderr)
        raise SystemExit(128 + signum) from None
    except (DataError, BaselineError, FileNotFoundError, ValueError) as e:
        print(f"palikit eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    exit_on_failures(reports, max_failed, ds)
