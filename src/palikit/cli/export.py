"""`palikit export MODEL --out DIR`: a model palikit loads (Hub id, Hub-layout folder, big_vision `.npz`,
`demo`), optionally with a LoRA adapter merged, or a trainer checkpoint (`output_dir/checkpoints/step-N`,
which holds only the trained parameters) or a run folder (its best checkpoint, else the newest:
`train.export.trainer_checkpoint`), written as
- `--format hub` (default): the Hugging Face Hub safetensors layout with its tokenizer, preprocessor and
  mask-codec files (`weights/export.save_hub_checkpoint`; a trainer checkpoint through
  `train.export.export_checkpoint`, the base model with its weights, LoRA merged): a folder transformers,
  vLLM and palikit load;
- `--format onnx`: the layout transformers.js and onnxruntime load, fp32 and any `--quantize` variants
  (`palikit.onnx`); a trainer checkpoint is first merged into a temporary Hub folder next to DIR.

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
    """The `PaliGemma` every export format starts from, on the CPU (a trainer checkpoint is first turned into
    a model folder: `export_trainer_checkpoint`)."""
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
    model: str = typer.Argument(..., help="What to export: a Hub id, a Hub-layout folder, a big_vision .npz, demo, "
                                "a trainer checkpoint (runs/x/checkpoints/step-N) or a run folder (runs/x: its best "
                                "checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="The folder to write (refused if it exists, unless --overwrite)."),
    fmt: str = typer.Option("hub", "--format", help="hub (safetensors, the Hub layout) or onnx (transformers.js / "
                            "onnxruntime layout)."),
    quantize: list[str] = typer.Option([], "--quantize", help="onnx: also write q8, q4 or q4f16 variants (repeat the "
                                       "option or give a comma-separated list)."),
    fp32: bool = typer.Option(True, "--fp32/--no-fp32", help="onnx: keep the fp32 graphs beside the quantized ones."),
    opset: int = typer.Option(None, "--opset", help="onnx: the ONNX opset (18-23, default 21)."),
    adapter: str = typer.Option(None, "--adapter", help="A LoRA adapter folder (PEFT format) merged in first."),
    dtype: str = typer.Option("auto", "--dtype", help="hub: float32, bfloat16, float16 or auto (the checkpoint's "
                              "own; a trainer checkpoint's: the training's export dtype). ONNX graphs are fp32 "
                              "(+ --quantize)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="The tokenizer, when it is not next to the weights "
                                  "(onnx needs a tokenizer.json)."),
    base_model: str = typer.Option(None, "--base-model", help="A trainer checkpoint's base model folder, when the one "
                                   "the run trained from has moved."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    final_logit_softcap: str = typer.Option("auto", "--final-logit-softcap", help="auto (the checkpoint's "
                                            "convention), a number, or off: what the export applies and records."),
    sliding_window: str = typer.Option("auto", "--sliding-window", help="auto, a number of tokens, or off."),
):
    """Write MODEL (or a trainer checkpoint) in the Hub safetensors layout (default) or as ONNX for
    transformers.js and onnxruntime."""
    from rich.console import Console

    from ..fileio import check_free_space
    from ..train.export import trainer_checkpoint
    from ..weights.resolve import get_config, resolve

    console = Console(stderr=True)
    quantize = [q.strip() for item in quantize for q in item.split(",") if q.strip()]
    check_options(fmt, quantize, opset, fp32, dtype)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    load = dict(adapter=adapter, tokenizer=tokenizer, final_logit_softcap=final_logit_softcap,
                sliding_window=sliding_window)
    step = trainer_checkpoint(model)
    if step is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in load.items() if v not in (None, "auto")]
        if given:
            raise ValueError(f"{', '.join(given)} apply to a model, not to a trainer checkpoint ({step}): it is "
                             "exported with its own recipe's tokenizer, conventions and LoRA (merged).")
        export_trainer_checkpoint(step, out, fmt, base_model, dtype, overwrite, (quantize, fp32, opset), console)
        return
    if base_model:
        raise ValueError(f"--base-model applies to a trainer checkpoint (runs/x/checkpoints/step-N or runs/x); "
                         f"{model!r} is a model: export it as it is.")
    if fmt == "hub":
        files = resolve(model, tokenizer)
        target = hub_dtype(dtype, files)
        check_free_space(out.parent, hub_bytes(get_config(files.weights), target))  # before a big model is loaded
        # loaded in the dtype it is written in (a bf16 checkpoint stays bf16); fp32 when an adapter is merged
        pg = load_for_export(model, dtype="float32" if adapter else target, **load)
        console.print(f"wrote {write_hub(pg, files, out, target, overwrite)} (Hub layout, {target})")
        return
    _export_onnx(model, out, quantize, fp32, opset, overwrite, load, console)


def check_options(fmt: str, quantize: list[str], opset: int | None, fp32: bool, dtype: str) -> None:
    """The options that belong to the other format, refused before anything is read."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if fmt == "hub" and (quantize or opset is not None or not fp32):
        raise ValueError("--quantize, --opset and --no-fp32 apply to --format onnx; the Hub layout stores one "
                         "dtype (--dtype).")
    if fmt == "onnx" and dtype != "auto":
        raise ValueError("--dtype applies to --format hub; ONNX graphs are fp32, smaller variants come from --quantize.")


def export_trainer_checkpoint(step: Path, out: Path, fmt: str, base_model: str | None, dtype: str, overwrite: bool,
                              onnx_options: tuple, console) -> None:
    """A trainer checkpoint: the Hub layout via `train.export.export_checkpoint` (the base model with the
    checkpoint's weights, LoRA merged), or ONNX from that merged model written to a temporary folder next to
    `out` (in fp32, as the ONNX graphs are; removed afterwards)."""
    import tempfile

    from ..train.export import export_checkpoint

    def log(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    if fmt == "hub":
        done = export_checkpoint(step, out, model=base_model, dtype=None if dtype == "auto" else hub_dtype(dtype, None),
                                 log=log)
        console.print(f"wrote {done} (Hub layout, from {step}): palikit predict IMG --model {done}", markup=False)
        return
    quantize, fp32, opset = onnx_options
    _onnx_options(quantize, fp32, opset)  # refused before the merge is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merged-", dir=out.parent) as tmp:
        merged = export_checkpoint(step, Path(tmp) / "model", model=base_model, dtype="float32", log=log)
        load = dict(adapter=None, tokenizer=None, final_logit_softcap="auto", sliding_window="auto")
        _export_onnx(str(merged), out, quantize, fp32, opset, overwrite, load, console)


def _onnx_options(quantize, fp32: bool, opset: int | None) -> tuple[tuple[str, ...], int]:
    """(the quantizations, the opset) once checked; onnx / onnxruntime importable."""
    from ..onnx.export import DEFAULT_OPSET, check_options as check_onnx, require_onnx

    opset = DEFAULT_OPSET if opset is None else opset
    quantize = check_onnx(quantize, opset)
    require_onnx()
    if not fp32 and not quantize:
        raise ValueError("--no-fp32 leaves nothing to write: add a --quantize variant.")
    return quantize, opset


def _export_onnx(model: str, out: Path, quantize, fp32: bool, opset: int | None, overwrite: bool, load: dict,
                 console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..onnx.export import GRAPHS, export_onnx, preflight
    from ..weights.resolve import get_config, resolve

    quantize, opset = _onnx_options(quantize, fp32, opset)
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
