"""Quantized checkpoints on disk: a Hub-layout folder whose safetensors hold the canonical quantized
tensors (`<layer>.qweight`, `.scales`, `.zeros`; see `model/quant.py`) with the published key
prefixes, and whose config.json carries a `quantization` block (format, version, method, bits,
group size, what stayed in float). `load_hf_checkpoint` (so `PaliGemma.from_pretrained` and every
`--model DIR`) reads such a folder through `load_quantized`.

transformers cannot read these folders (its own `quantization_config` formats are others); palikit
refuses, with what to do, a block it does not know or one its tensors contradict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import PaliGemmaConfig, read_config_json
from ..model import PaliGemmaModel, build_model
from ..model.quant import QuantSpec, empty_quantized

QUANT_KEY = "quantization"


class CheckpointError(ValueError):
    """A quantized folder palikit cannot load as it is (says what is wrong and what to do)."""


def quant_spec(config_dict: dict[str, Any], source: str | Path = "config.json") -> QuantSpec | None:
    """The `quantization` block of a parsed config.json as a QuantSpec, None when there is none."""
    block = config_dict.get(QUANT_KEY)
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") != "palikit":
        raise CheckpointError(f"{source}: the '{QUANT_KEY}' block is not palikit's ({block!r:.120}); this palikit "
                              "reads quantized folders written by `palikit quantize`")
    if block.get("version", 1) > 1:
        raise CheckpointError(f"{source}: quantization format version {block['version']} is newer than this palikit "
                              "reads (1); upgrade palikit")
    try:
        return QuantSpec.from_dict(block)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad '{QUANT_KEY}' block: {e}") from None


def folder_spec(path: str | Path) -> QuantSpec | None:
    """The quantization of a checkpoint folder (or file in one), None for a float checkpoint."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if not (folder / "config.json").is_file():
        return None
    d, cfg_path = read_config_json(folder)
    return quant_spec(d, cfg_path)


def _check_against_block(model: PaliGemmaModel, sd: dict[str, torch.Tensor], spec: QuantSpec, source: str) -> None:
    """Every tensor the block implies is there with its shape and dtype, and nothing else."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    problems = [f"missing {k} {shape} {str(dt).removeprefix('torch.')}" for k, (shape, dt) in expected.items()
                if k not in sd]
    problems += [f"unexpected {k} {tuple(t.shape)}" for k, t in sd.items() if k not in expected]
    for k, t in sd.items():
        if k in expected:
            shape, dt = expected[k]
            if tuple(t.shape) != shape or (not dt.is_floating_point and t.dtype != dt):
                problems.append(f"{k}: the block implies {shape} {str(dt).removeprefix('torch.')}, the file holds "
                                f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(
            f"{source}: config.json's quantization block ({spec.name}, keep_vision={spec.keep_vision}, "
            f"{len(spec.int8_layers)} int8 fallback layers) disagrees with the tensors:\n  "
            + "\n  ".join(problems[:12]) + more
            + "\nThe folder was edited or mixed up: quantize the float checkpoint again (`palikit quantize`).")


def load_quantized(sd: dict[str, torch.Tensor], config: PaliGemmaConfig, spec: QuantSpec, path: str | Path,
                   dtype: torch.dtype | None = None) -> PaliGemmaModel:
    """A quantized folder's tensors (`hf.read_safetensors`) -> a PaliGemmaModel with quantized
    modules (float parts in `dtype`)."""
    try:
        model = empty_quantized(build_model(config, device="meta", dtype=dtype), spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: config.json's quantization block ({spec.name}) disagrees with the tensors "
                              f"and the architecture: {e}. The folder was edited or mixed up: quantize the float "
                              "checkpoint again (`palikit quantize`).") from None
    _check_against_block(model, sd, spec, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_quantized(model: PaliGemmaModel, folder: str | Path, card: str | None = None) -> Path:
    """Write a quantized model: safetensors + config.json with the `quantization` block + README.md."""
    from ..fileio import atomic_write_bytes, atomic_write_json
    from .export import save_hub_checkpoint

    spec = getattr(model, "quant_spec", None)
    if spec is None:
        raise ValueError("save_quantized: the model is not quantized (model.quant.quantize_model first)")
    folder = Path(folder)
    save_hub_checkpoint(model, folder)
    cfg, cfg_path = read_config_json(folder)
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    cfg[QUANT_KEY] = spec.to_dict()
    atomic_write_json(cfg_path, cfg)
    if card is not None:
        atomic_write_bytes(folder / "README.md", card)
    return folder
