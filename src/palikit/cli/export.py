"""`palikit export MODEL --out DIR`: a model palikit loads (Hub id, Hub-layout folder, big_vision `.npz`,
`demo`), optionally with a LoRA adapter merged, written as
- `--format hub` (default): the Hugging Face Hub safetensors layout with its tokenizer, preprocessor and
  mask-codec files (`weights/export.save_hub_checkpoint`): a folder transformers, vLLM and palikit load;
- `--format onnx`: the layout transformers.js and onnxruntime load, fp32 and any `--quantize` variants
  (`palikit.onnx`).

Both are written into a temporary folder next to DIR and renamed into place; an existing DIR is refused
without `--overwrite`, and a destination without the free space the export needs is refused up front.
Where MODEL comes from is decided in one place (`load_for_export`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from . import app

FORMATS = ("hub", "onnx")
_HUB_DTYPES = ("float32", "bfloat16", "float16")


def load_for_export(model: str, *, adapter: str | None, tokenizer: str | None, dtype: str, final_logit_softcap: str,
                    sliding_window: str):
    """The `PaliGemma` every export format starts from, on the CPU. (A new kind of MODEL, e.g. a trainer's
    checkpoint folder, is one more branch here.)"""
    from ..api import PaliGemma
    from ..weights.conventions import parse_override

    return PaliGemma.from_pretrained(model, device="cpu", dtype=dtype, tokenizer=tokenizer, adapter=adapter,
                                     final_logit_softcap=parse_override(final_logit_softcap, "final_logit_softcap"),
                                     sliding_window=parse_override(sliding_window, "sliding_window"))


def hub_dtype(requested: str, files) -> str:
    """--dtype auto: the dtype the checkpoint's config.json records (float32 when it says nothing)."""
    if requested != "auto":
        if requested not in _HUB_DTYPES:
            raise ValueError(f"--dtype {requested!r}: choose auto, {', '.join(_HUB_DTYPES)}")
        return requested
    if files.format == "hf":
        cfg = json.loads((files.weights / "config.json").read_text())
        stored = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
        if stored in _HUB_DTYPES:
            return stored
    return "float32"


def hub_bytes(config, dtype: str) -> int:
    """Disk the Hub layout needs: every weight in `dtype`, plus the side files."""
    import torch

    from ..model import count_parameters

    return count_parameters(config) * torch.finfo(getattr(torch, dtype)).bits // 8 + 2**24


def write_hub(pg, files, out: Path, dtype: str, overwrite: bool) -> Path:
    """The Hub layout: weights, config.json and model card, plus the tokenizer / preprocessor / codec files."""
    import torch

    from ..fileio import atomic_dir
    from ..weights.export import save_hub_checkpoint

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    torch_dtype = getattr(torch, dtype)

    def fill(tmp: Path) -> None:
        save_hub_checkpoint(pg.model, tmp, dtype=torch_dtype, max_shard_bytes=5 * 2**30)
        folder = files.tokenizer.parent
        for f in [files.tokenizer] + [folder / n for n in ("tokenizer_config.json", "special_tokens_map.json")]:
            if f.is_file():
                shutil.copy(f, tmp / f.name)
        pg.processor.save(tmp)
        if files.mask_codec is not None:
            shutil.copy(files.mask_codec, tmp / "vae-oid.npz")

    return atomic_dir(out, fill)


@app.command()
def export(
    model: str = typer.Argument(..., help="What to export: a Hub id, a Hub-layout folder, a big_vision .npz, or demo."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (refused if it exists, unless --overwrite)."),
    fmt: str = typer.Option("hub", "--format", help="hub (safetensors, the Hub layout) or onnx (transformers.js / "
                            "onnxruntime layout)."),
    quantize: list[str] = typer.Option([], "--quantize", help="onnx: also write q8, q4 or q4f16 variants (repeat the "
                                       "option or give a comma-separated list)."),
    fp32: bool = typer.Option(True, "--fp32/--no-fp32", help="onnx: keep the fp32 graphs beside the quantized ones."),
    opset: int = typer.Option(None, "--opset", help="onnx: the ONNX opset (18-23, default 21)."),
    adapter: str = typer.Option(None, "--adapter", help="A LoRA adapter folder (PEFT format) merged in first."),
    dtype: str = typer.Option("auto", "--dtype", help="hub: float32, bfloat16, float16 or auto (the checkpoint's "
                              "own). ONNX graphs are fp32 (+ --quantize)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="The tokenizer, when it is not next to the weights "
                                  "(onnx needs a tokenizer.json)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    final_logit_softcap: str = typer.Option("auto", "--final-logit-softcap", help="auto (the checkpoint's "
                                            "convention), a number, or off: what the export applies and records."),
    sliding_window: str = typer.Option("auto", "--sliding-window", help="auto, a number of tokens, or off."),
):
    """Write MODEL in the Hub safetensors layout (default) or as ONNX for transformers.js and onnxruntime."""
    from rich.console import Console

    from ..fileio import check_free_space
    from ..weights.resolve import get_config, resolve

    console = Console(stderr=True)
    quantize = [q.strip() for item in quantize for q in item.split(",") if q.strip()]
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    load = dict(adapter=adapter, tokenizer=tokenizer, final_logit_softcap=final_logit_softcap,
                sliding_window=sliding_window)
    if fmt == "hub":
        if quantize or opset is not None or not fp32:
            raise ValueError("--quantize, --opset and --no-fp32 apply to --format onnx; the Hub layout stores one "
                             "dtype (--dtype).")
        files = resolve(model, tokenizer)
        target = hub_dtype(dtype, files)
        check_free_space(out.parent, hub_bytes(get_config(files.weights), target))  # before a big model is loaded
        # loaded in the dtype it is written in (a bf16 checkpoint stays bf16); fp32 when an adapter is merged
        pg = load_for_export(model, dtype="float32" if adapter else target, **load)
        console.print(f"wrote {write_hub(pg, files, out, target, overwrite)} (Hub layout, {target})")
        return
    if dtype != "auto":
        raise ValueError("--dtype applies to --format hub; ONNX graphs are fp32, smaller variants come from --quantize.")
    _export_onnx(model, out, quantize, fp32, opset, overwrite, load, console)


def _export_onnx(model: str, out: Path, quantize, fp32: bool, opset: int | None, overwrite: bool, load: dict,
                 console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..onnx.export import DEFAULT_OPSET, GRAPHS, check_options, export_onnx, preflight, require_onnx
    from ..weights.resolve import get_config, resolve

    opset = DEFAULT_OPSET if opset is None else opset
    quantize = check_options(quantize, opset)
    require_onnx()
    if not fp32 and not quantize:
        raise ValueError("--no-fp32 leaves nothing to write: add a --quantize variant.")
    files = resolve(model, load["tokenizer"])
    preflight(get_config(files.weights), out, files.tokenizer, quantize, fp32)  # before a big model is loaded
    pg = load_for_export(model, dtype="float32", **load)
    steps = len(GRAPHS) * (1 + len(quantize)) + 1
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("export", total=steps)

        def log(message: str) -> None:
            step = message.startswith(("exporting", "quantizing", "wrote"))
            bar.update(task, advance=int(step), description=message)

        # the command owns the model: each part is freed once its graph is written (3B models fit in 24 GB)
        export_onnx(pg.model, out, tokenizer_file=files.tokenizer, processor=pg.processor, quantize=quantize,
                    keep_fp32=fp32, opset=opset, overwrite=overwrite, mask_codec=files.mask_codec, consume=True,
                    log=log)
    variants = ", ".join((["fp32"] if fp32 else []) + list(quantize))
    console.print(f"wrote {out} (transformers.js / onnxruntime layout: {variants})")
