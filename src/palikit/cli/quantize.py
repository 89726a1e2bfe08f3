"""`palikit quantize MODEL --to int8|int4 --out DIR`: a quantized copy of a checkpoint (safetensors
with scales/zeros, config.json's `quantization` block, tokenizer / preprocessor / mask codec copied)
and a model card with the measured quality: the demo model's test split (every task) when MODEL is the
bundled demo, or `--eval DATA --task T`; `--no-eval` skips it and says so in the card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import typer

from . import app

SIDE_FILES = ("tokenizer.json", "tokenizer.model", "paligemma_tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "preprocessor_config.json", "vae-oid.npz", "mask_codec.npz")


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Float checkpoint folder, Hub id, or 'demo' (the bundled demo model)."),
    to: str = typer.Option(..., "--to", help="int8 (per output channel) or int4 (groups along the input)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the quantized checkpoint to."),
    group_size: int = typer.Option(None, help="int4 group size (32, 64, 128, 256). Default 64; layers it does not "
                                              "fit stay int8 (an explicit size must fit every layer)."),
    keep_vision: bool = typer.Option(False, "--keep-vision", help="Keep the vision tower and projector in float."),
    eval_data: str = typer.Option(None, "--eval", help="Measure quality on this data set (JSONL / COCO) for the card."),
    task: str = typer.Option(None, help="The --eval data set's task (ocr, vqa, caption, detect, ...)."),
    eval_images: int = typer.Option(500, help="Demo model: test-split images to evaluate on."),
    limit: int = typer.Option(None, help="--eval: only the first N samples."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the quality measurement (the card says so)."),
    device: str = typer.Option("cpu", help="Device for quantizing and the evaluation."),
):
    """Quantize a checkpoint's weights (round to nearest) and write a palikit-quantized folder."""
    from ..api import PaliGemma
    from ..model.quant import parse_quantize, plan, weight_bytes
    from ..weights.quantized import folder_spec, save_quantized
    from ..weights.resolve import resolve

    bits = parse_quantize(to)
    if bits is None:
        raise ValueError("--to none: nothing to do; use --to int8 or --to int4")
    files = resolve(model)
    src_folder = files.weights if files.weights.is_dir() else files.weights.parent
    spec = folder_spec(files.weights) if files.format == "hf" else None
    if spec is not None:
        raise ValueError(f"{model} is already quantized ({spec.name}); quantize its float checkpoint instead "
                         "(quantizing twice compounds the rounding error)")
    if out.resolve() == src_folder.resolve():
        raise ValueError(f"--out {out} is the source folder; write the quantized copy elsewhere")
    is_demo = _is_bundled_demo(src_folder)
    if eval_data is not None and task is None:
        raise ValueError("--eval DATA needs --task (the data set's task: ocr, vqa, caption, detect, ...)")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    pg_float = PaliGemma.from_pretrained(model, device=device, dtype="float32")
    spec = plan(pg_float.model, bits, group_size, keep_vision)  # bad options fail before any work
    log(f"quantizing {model} to {spec.name} (keep_vision={keep_vision}, {len(spec.int8_layers)} layers kept int8 "
        "because the group does not fit them)")
    pg_q = PaliGemma.from_pretrained(model, device=device, dtype="float32", quantize=to, group_size=group_size,
                                     keep_vision=keep_vision)
    quality = None
    if not no_eval and (is_demo or eval_data is not None):
        quality = _measure(pg_float, pg_q, spec.name.split()[0], out, is_demo, eval_data, task, eval_images, limit, log)
    card = model_card(model, pg_q.model.quant_spec, weight_bytes(pg_float.model), weight_bytes(pg_q.model), quality)
    save_quantized(pg_q.model, out, card)
    for name in SIDE_FILES:
        if (src_folder / name).is_file():
            shutil.copy2(src_folder / name, out / name)
    if files.tokenizer is not None and not (out / files.tokenizer.name).exists():
        shutil.copy2(files.tokenizer, out / files.tokenizer.name)
    log(f"wrote {out} ({sum(p.stat().st_size for p in out.glob('*.safetensors')) / 2**20:.1f} MiB of weights); "
        f"load it with --model {out}")
    if quality is not None:
        (out / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
        from ..eval.quantized import quality_table

        print(quality_table(quality))


def _is_bundled_demo(folder: Path) -> bool:
    from ..assets import bundled_demo_model

    demo = bundled_demo_model()
    return demo is not None and demo.resolve() == folder.resolve()


def _measure(pg_float, pg_q, label, out, is_demo, eval_data, task, eval_images, limit, log) -> dict:
    import tempfile

    from ..eval.quantized import QualityTask, compare_quality, demo_tasks

    with tempfile.TemporaryDirectory(prefix="palikit-quantize-") as tmp:
        if eval_data is not None:
            tasks = [QualityTask(task, eval_data, task, limit=limit)]
            where = f"{eval_data} ({task})"
        else:
            tasks = demo_tasks(Path(tmp) / "data", eval_images, pg_float.mask_codec)
            where = f"the demo model's test split (first {eval_images} images, every task)"
        log(f"measuring quality on {where}: float and {label}")
        result = compare_quality({"none": pg_float, label: pg_q}, tasks, Path(tmp) / "eval")
    result["data"] = where
    return result


def model_card(source: str, spec, float_bytes: int, quant_bytes: int, quality: dict | None) -> str:
    from ..eval.quantized import quality_table

    kept = ", ".join(spec.kept) or "nothing but norms, biases, the patch embedding and position embeddings"
    lines = [
        f"# {Path(str(source)).name} ({spec.name})", "",
        f"Quantized by `palikit quantize` from `{source}`: round-to-nearest weights, {spec.name} for every Linear of "
        "the decoder" + ("" if spec.keep_vision else ", the vision tower and the projector")
        + ", the tied embedding / LM head in int8 per row.", "",
        "| | |", "|---|---|",
        f"| method | {spec.method} (round to nearest) |",
        f"| bits | {spec.bits}" + (f", groups of {spec.group_size} inputs (asymmetric)" if spec.bits == 4 else
                                    " per output channel (symmetric)") + " |",
        "| embedding / LM head | int8 per row |",
        f"| kept in float | {kept} |",
        f"| int8 instead of int4 | {len(spec.int8_layers)} layers whose width the group does not divide |",
        f"| weight bytes read per decode step | {quant_bytes / 1e6:.1f} MB (float32 {float_bytes / 1e6:.1f} MB) |",
        "", "Load it with `PaliGemma.from_pretrained(\"FOLDER\")` or `--model FOLDER` on any palikit command. "
        "transformers does not read this format (config.json's `quantization` block is palikit's).", "",
        "## Quality", "",
    ]
    if quality is None:
        lines.append("Not measured (no --eval data given, or --no-eval). Measure before trusting it: "
                     "`palikit quantize ... --eval DATA --task TASK`.")
    else:
        lines += [f"Measured on {quality['data']} with `palikit eval` metrics, float32 vs this model "
                  "(greedy decoding; 'same answers' = token-for-token equal to the float model's):", "",
                  quality_table(quality)]
    return "\n".join(lines) + "\n"
