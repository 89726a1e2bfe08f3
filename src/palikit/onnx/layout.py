"""The files around the graphs in a transformers.js export folder, and the export's size beforehand.

What transformers.js 4 reads (checked in its source, `@huggingface/transformers` 4.3):
- `config.json`: `model_type` "paligemma" picks `PaliGemmaForConditionalGeneration` (its Llava class) and
  `PaliGemmaProcessor`; `image_token_index`; `text_config` sizes the empty first-call cache
  (`num_key_value_heads`, `head_dim`, `num_hidden_layers`); `transformers.js_config` says which files keep
  their weights in `<file>_data` (`use_external_data_format`) and, when there are no fp32 graphs,
  which dtype to load by default.
- `generation_config.json`: BOS / EOS / PAD ids.
- `preprocessor_config.json`: the resize and `image_seq_length` (how many `<image>` tokens it inserts).
- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`.

BOS: transformers.js's processor builds `<image>` x N + `<bos>` + prompt + "\\n" and tokenizes it with
special tokens on, so a tokenizer.json whose post-processor adds `<bos>` (Gemma's, the demo model's) gives
`[<bos>, <image> x N, <bos>, ...]`: one token more than palikit and transformers feed, every position
shifted. The exported tokenizer.json's post-processor therefore adds nothing, and tokenizer_config.json
says `add_bos_token: false` (as PaliGemma 2's Hub files do): transformers.js then builds exactly
palikit's ids `[<image> x N, <bos>, prompt, "\\n"]`. palikit and transformers never use that
post-processor (they add BOS from the prompt layout), so the same files serve them too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..config import PaliGemmaConfig
from ..fileio import atomic_write_json

SUFFIXES = {"fp32": "", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}  # transformers.js `dtype` -> file suffix
_SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "additional_special_tokens": ["<image>"]}
# bytes per weight of each variant, relative to fp32's 4 (q4: 4 bits + an fp32 scale per block of 32)
_BYTES_PER_WEIGHT = {"fp32": 4.0, "q8": 1.0, "q4": 0.5 + 4 / 32, "q4f16": 0.5 + 2 / 32}


def suffix(mode: str) -> str:
    return SUFFIXES[mode]


def default_dtype(quantize: Sequence[str], keep_fp32: bool) -> str:
    return "fp32" if keep_fp32 else quantize[0]


def check_tokenizer(path: str | Path) -> None:
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        raise ValueError(f"transformers.js reads tokenizer.json, and this model's tokenizer is {path}; pass the "
                         "checkpoint's tokenizer.json (--tokenizer) to export it for the edge.")


def graph_weights(config: PaliGemmaConfig) -> dict[str, tuple[int, int]]:
    """{graph: (fp32 weight bytes, its largest weight's bytes)} from the config alone (meta device). The
    decoder and the embedding graph each hold the tied embedding (the decoder as its head)."""
    from ..model import build_model

    sizes: dict[str, list[int]] = {"vision_encoder": [], "embed_tokens": [], "decoder_model_merged": []}
    for name, p in build_model(config, "meta").named_parameters():
        graph = ("embed_tokens" if name.startswith("language_model.embed_tokens") else
                 "decoder_model_merged" if name.startswith("language_model") else "vision_encoder")
        sizes[graph].append(4 * p.numel())
    sizes["decoder_model_merged"].append(4 * config.output_vocab_size * config.text.hidden_size)
    return {g: (sum(v), max(v)) for g, v in sizes.items()}


def estimate_bytes(config: PaliGemmaConfig, quantize: Sequence[str], keep_fp32: bool) -> int:
    """Disk the export needs at its peak: the fp32 graphs (written first, the quantizers' input, even when
    not kept) and every variant."""
    fp32 = sum(b for b, _ in graph_weights(config).values())
    total = fp32 + sum(fp32 * _BYTES_PER_WEIGHT[q] / _BYTES_PER_WEIGHT["fp32"] for q in quantize)
    return int(total * 1.05) + 2**24  # headroom: graph structure, tokenizer, codec


def available_memory() -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        return int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(config: PaliGemmaConfig, quantize: Sequence[str], freed_bytes: int = 0) -> None:
    """OSError when a quantizer would need more memory than is available (`freed_bytes`: what the export
    frees before quantizing, the consumed model), naming the need and the way out. No check where
    /proc/meminfo is missing."""
    from .quantize import ram_needed

    available = available_memory()
    if available is None:
        return
    available += freed_bytes
    graphs = graph_weights(config)
    for mode in quantize:
        need = max(ram_needed(mode, size, largest) for size, largest in graphs.values())
        if need > available:
            hint = ("onnxruntime's 8-bit quantizer holds the whole fp32 graph and several fp32 copies of its largest "
                    "weight" if mode == "q8" else "the 4-bit quantizer holds a few copies of the largest weight")
            raise OSError(f"--quantize {mode} of this model needs about {need / 1e9:.1f} GB of memory ({hint}) and "
                          f"{available / 1e9:.1f} GB is available. Use q4 (it needs far less), free memory, or "
                          "export on a machine with more.")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_side_files(folder: Path, config: PaliGemmaConfig, graph_files: dict[str, list[str]], *,
                     tokenizer_file: str | Path, processor, quantize: Sequence[str], keep_fp32: bool,
                     mask_codec: str | Path | None = None) -> None:
    """config.json, generation_config.json, preprocessor_config.json, the tokenizer files, README.md (and
    the mask codec when given) next to `folder/onnx/`."""
    hf = config.to_hf_dict()
    external = {name: len(data) for name, data in sorted(graph_files.items()) if data}
    js: dict = {}
    if external:
        js["use_external_data_format"] = external
    if not keep_fp32:
        js["dtype"] = default_dtype(quantize, keep_fp32)
    atomic_write_json(folder / "config.json", {**hf, "torch_dtype": "float32",
                                                **({"transformers.js_config": js} if js else {})})
    atomic_write_json(folder / "generation_config.json", {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id})
    proc = processor.to_dict()
    proc["image_seq_length"] = config.vision.num_image_tokens  # the count transformers.js inserts
    atomic_write_json(folder / "preprocessor_config.json", proc)
    write_tokenizer_files(folder, Path(tokenizer_file))
    if mask_codec is not None:
        shutil.copy(mask_codec, folder / Path(mask_codec).name)
    (folder / "README.md").write_text(model_card(config, graph_files, quantize, keep_fp32))


def write_tokenizer_files(folder: Path, tokenizer_file: Path) -> None:
    """tokenizer.json with a post-processor that adds no BOS (see the module docstring), and the two
    config files transformers.js reads beside it."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tok.save(str(folder / "tokenizer.json"))
    source = tokenizer_file.parent / "tokenizer_config.json"
    cfg = json.loads(source.read_text()) if source.is_file() else {"tokenizer_class": "GemmaTokenizer", **_SPECIAL}
    cfg |= {"add_bos_token": False, "add_eos_token": False}
    atomic_write_json(folder / "tokenizer_config.json", cfg)
    special = tokenizer_file.parent / "special_tokens_map.json"
    atomic_write_json(folder / "special_tokens_map.json", json.loads(special.read_text()) if special.is_file()
                      else _SPECIAL)


def model_card(config: PaliGemmaConfig, graph_files: dict[str, list[str]], quantize: Sequence[str],
               keep_fp32: bool) -> str:
    t = config.text
    dtypes = (["fp32"] if keep_fp32 else []) + list(quantize)
    files = "\n".join(f"- `onnx/{name}`" + (f" (+ `{', '.join(data)}`)" if data else "")
                      for name, data in sorted(graph_files.items()))
    return (
        "---\nlibrary_name: transformers.js\npipeline_tag: image-text-to-text\ntags: [paligemma, palikit, onnx]\n---\n\n"
        f"# {config.name} (ONNX)\n\n{config.family} ({config.vision.image_size}px, {config.vision.num_image_tokens} "
        f"image tokens) exported by palikit (`palikit export --format onnx`) for transformers.js and onnxruntime. "
        f"dtypes: {', '.join(dtypes)}.\n\n```js\n"
        "import { AutoProcessor, PaliGemmaForConditionalGeneration, RawImage, env } from '@huggingface/transformers';\nenv.allowRemoteModels = false; env.localModelPath = '/path/to/parent/';\n"
        f"const model = await PaliGemmaForConditionalGeneration.from_pretrained('{config.name}', {{ dtype: "
        f"'{dtypes[0]}' }});\nconst processor = await AutoProcessor.from_pretrained('{config.name}');\n"
        "const inputs = await processor(await RawImage.read('image.png'), '<image>caption en');\n"
        "const out = await model.generate({ ...inputs, max_new_tokens: 64, do_sample: false });\n```\n\n"
        "Inside the graphs: image features unscaled, text embeddings x sqrt(hidden) (embed_tokens), the prefix-LM "
        "mask (the first decoder call is the bidirectional prefix, later tokens causal), attention soft-cap "
        f"{t.attn_logit_softcapping or 'off'}, final logit soft-cap {t.final_logit_softcapping or 'off'}, sliding "
        f"window {t.sliding_window or 'off'}. The tokenizer adds no BOS of its own (the processor puts it after the "
        f"image tokens). Images at {config.vision.image_size}px go in unresized; other sizes are resized by "
        "transformers.js, whose bicubic differs slightly from PIL's.\n\n" + files + "\n"
    )
