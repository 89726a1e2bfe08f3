"""Export a loaded PaliGemma to ONNX in the layout transformers.js loads (`onnx/vision_encoder.onnx`,
`onnx/embed_tokens.onnx`, `onnx/decoder_model_merged.onnx`, their quantized variants under the file
names transformers.js picks for its `dtype` option, and the JSON/tokenizer files next to them:
`layout.py`), with `torch.onnx.export` (the dynamo exporter) and onnxruntime's quantizers (`quantize.py`).

Memory: the graphs are exported one at a time and each is saved before the next is traced; weights are
written tensor by tensor (external data beyond `EXTERNAL_DATA_BYTES`). With `consume=True` the model is
converted in place and each part is freed once its graph is on disk, so the peak stays near one copy
of the model (`palikit export` of a PaliGemma 2 3B Hub checkpoint to q4: peak RSS 16.9 GiB, measured).

Publishing: everything is written into a temporary folder next to the destination, then renamed into
place (`fileio.atomic_dir`): a failure or a kill never leaves half an export under the destination name.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..fileio import atomic_dir, check_free_space, plain_modes
from ..model import PaliGemmaModel
from . import layout
from .graphs import Decoder, EmbedTokens, VisionEncoder, export_ready
from .quantize import QUANTIZATIONS, quantize_file

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(18, 24)  # torch.onnx's exporter starts at 18; onnxruntime-node 1.30 runs up to 23
INT4_OPSET = 21  # int4 tensors (q4's weights) exist from opset 21
EXTERNAL_DATA_BYTES = 2**30  # graphs with more weight bytes than this keep them in `<file>_data`
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
_EXAMPLE = dict(batch=2, seq=5, past=3)  # example sizes for tracing: > 1, so no dimension is specialised


def require_onnx() -> None:
    """ImportError with the install command when the onnx extra is missing."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"--format onnx needs {', '.join(missing)}: pip install 'palikit[onnx]'")


def check_options(quantize: Sequence[str], opset: int) -> tuple[str, ...]:
    """The requested quantizations, validated (a ValueError names the bad value and the choices)."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} is not supported: choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
                         f"(torch.onnx exports from 18; onnxruntime-node 1.30, which transformers.js 4 runs, reads "
                         f"up to 23). Default: {DEFAULT_OPSET}.")
    bad = [q for q in quantize if q not in QUANTIZATIONS]
    if bad:
        raise ValueError(f"unsupported quantization {bad[0]!r}: choose from {', '.join(QUANTIZATIONS)} (q8: 8-bit "
                         "dynamic, transformers.js dtype 'q8'; q4: 4-bit MatMulNBits; q4f16: q4 with fp16 activations)")
    four_bit = [q for q in quantize if q.startswith("q4")]
    if four_bit and opset < INT4_OPSET:
        raise ValueError(f"--quantize {four_bit[0]} stores int4 weights, which ONNX has from opset {INT4_OPSET}; "
                         f"use --opset {INT4_OPSET} or higher (default {DEFAULT_OPSET}).")
    return tuple(dict.fromkeys(quantize))


def export_onnx(model: PaliGemmaModel, out: str | Path, *, tokenizer_file: str | Path, processor,
                quantize: Sequence[str] = (), keep_fp32: bool = True, opset: int = DEFAULT_OPSET,
                overwrite: bool = False, mask_codec: str | Path | None = None, consume: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Write the transformers.js layout of `model` to `out` (see the module docstring). `tokenizer_file`:
    the model's tokenizer.json; `processor`: its `ImageProcessor`; `quantize`: any of q8, q4, q4f16;
    keep_fp32=False drops the fp32 graphs once the quantized ones are written (transformers.js is told
    which dtype to load by default). Refuses an existing `out` without `overwrite`, an unsupported
    opset or quantization, and a destination without the free space the export needs."""
    quantize = check_options(quantize, opset)
    require_onnx()
    if not keep_fp32 and not quantize:
        raise ValueError("keep_fp32=False (--no-fp32) leaves nothing to write: add a --quantize variant.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                              "another --out.")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    preflight(model.config, out, tokenizer_file, quantize, keep_fp32, freed_bytes=model_bytes if consume else 0)

    def fill(tmp: Path) -> None:
        files = export_graphs(model, tmp / "onnx", quantize=quantize, keep_fp32=keep_fp32, opset=opset,
                              consume=consume, log=log)
        layout.write_side_files(tmp, model.config, files, tokenizer_file=tokenizer_file, processor=processor,
                                quantize=quantize, keep_fp32=keep_fp32, mask_codec=mask_codec)
        plain_modes(tmp)  # readable like any file the user writes (a static server for transformers.js)

    atomic_dir(out, fill)
    log(f"wrote {out} ({layout.folder_bytes(out) / 1e6:,.1f} MB)")
    return out


def preflight(config, out: Path, tokenizer_file, quantize: Sequence[str], keep_fp32: bool, freed_bytes: int = 0):
    """The checks that need no weights: a tokenizer.json, the disk space and the quantizers' memory
    (`freed_bytes`: memory the export frees before quantizing). Run before a large model is even loaded."""
    layout.check_tokenizer(tokenizer_file)
    check_free_space(Path(out).parent, layout.estimate_bytes(config, quantize, keep_fp32))
    layout.check_memory(config, quantize, freed_bytes)


def export_graphs(model: PaliGemmaModel, folder: Path, *, quantize: Sequence[str] = (), keep_fp32: bool = True,
                  opset: int = DEFAULT_OPSET, consume: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """The three graphs in fp32 and every quantized variant under `folder`; returns {file name: its external
    data file names ([] when the weights are inside the .onnx)}."""
    folder.mkdir(parents=True, exist_ok=True)
    model = export_ready(model, consume=consume).float().eval()
    written: dict[str, list[str]] = {}
    for name in GRAPHS:
        module, args, names, dynamic = _graph(name, model)
        if consume and name == "decoder_model_merged":
            model.language_model.embed_tokens = None  # the head holds its own transposed copy now
        log(f"exporting {name} (opset {opset})")
        written.update(_export_one(module, args, names, dynamic, folder / f"{name}.onnx", opset))
        del module, args
        if consume:
            _free_part(model, name)
        gc.collect()
    del model
    gc.collect()
    for name in GRAPHS:
        for mode in quantize:
            target = folder / f"{name}{layout.suffix(mode)}.onnx"
            log(f"quantizing {name} to {mode}")
            data = quantize_file(folder / f"{name}.onnx", target, mode, external=_is_large(folder / f"{name}.onnx"))
            written[target.name] = data
    if not keep_fp32:
        for name in GRAPHS:
            for f in [f"{name}.onnx", *written.pop(f"{name}.onnx")]:
                (folder / f).unlink()
    return written


def _graph(name: str, model: PaliGemmaModel):
    """(module, example args, (input names, output names), dynamic shapes) of one graph."""
    cfg = model.config
    Dim = torch.export.Dim
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    B, T, P = _EXAMPLE["batch"], _EXAMPLE["seq"], _EXAMPLE["past"]
    if name == "vision_encoder":
        S = cfg.vision.image_size
        args = (torch.zeros(B, cfg.vision.num_channels, S, S),)
        return VisionEncoder(model).eval(), args, (["pixel_values"], ["image_features"]), ({0: batch},)
    if name == "embed_tokens":
        args = (torch.zeros(B, T, dtype=torch.long),)
        return EmbedTokens(model).eval(), args, (["input_ids"], ["inputs_embeds"]), ({0: batch, 1: seq},)
    t = cfg.text
    kv_names = [f"{i}.{kind}" for i in range(t.num_hidden_layers) for kind in ("key", "value")]
    past = tuple(torch.zeros(B, t.num_key_value_heads, P, t.head_dim) for _ in kv_names)
    args = (torch.zeros(B, T, t.hidden_size), torch.ones(B, P + T, dtype=torch.long),
            torch.arange(P + 1, P + T + 1).expand(B, T), torch.tensor(1), *past)
    names = (["inputs_embeds", "attention_mask", "position_ids", "num_logits_to_keep"]
             + [f"past_key_values.{n}" for n in kv_names], ["logits"] + [f"present.{n}" for n in kv_names])
    # transformers.js builds the empty first-call cache from these dimension names: "batch_size" -> the
    # batch, any other name -> 0 (`resolveCacheShape`)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim("total_sequence_length")}, {0: batch, 1: seq}, None,
               tuple({0: batch, 2: Dim("past_sequence_length")} for _ in kv_names))
    return Decoder(model).eval(), args, names, dynamic


def _export_one(module, args, names, dynamic, path: Path, opset: int) -> dict[str, list[str]]:
    import onnx_ir as ir

    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms" x 4
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on axis renaming and pytree deprecations
            program = torch.onnx.export(module, args, input_names=names[0], output_names=names[1],
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)
    finally:
        quiet.setLevel(level)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    data = f"{path.name}_data" if weight_bytes > EXTERNAL_DATA_BYTES else None
    program.model.producer_name = "palikit"
    ir.save(program.model, path, external_data=data)  # tensor by tensor into the data file
    return {path.name: [data] if data else []}


def _is_large(path: Path) -> bool:
    return Path(f"{path}_data").exists()


def _free_part(model: PaliGemmaModel, graph: str) -> None:
    """Drop the weights no later graph needs (consume=True); the embedding goes when the decoder is built."""
    if graph == "vision_encoder":
        model.vision_tower = model.multi_modal_projector = None
    elif graph == "decoder_model_merged":
        model.language_model = None
