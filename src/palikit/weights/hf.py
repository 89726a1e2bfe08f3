"""Hugging Face safetensors checkpoints: read single-file or sharded (`model.safetensors.index.json`)
weights in every PaliGemma key layout in use, map them onto palikit's module names, and load them
strictly into a model built on the meta device (`assign=True`: each tensor is read from the
memory-mapped file once, straight onto the target device, with no second copy).

Layouts accepted: every one in the table of `weights/layouts.py` (published Hub files, transformers
5.x in memory and its 4.52-5.5 variant, 5.x `save_pretrained`'s hybrid), told apart per key.

The head is always tied to the embedding; a stored copy is checked to be identical and dropped.
SigLIP's attention-pooling head (`vision_tower[.vision_model].head.*`, which transformers writes when a
config lacks `vision_use_head: false`) is unused by PaliGemma: dropped with one log line, as
transformers loads such files. Any other unexpected tensor is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..config import PaliGemmaConfig
from ..model import PaliGemmaModel, build_model
from .layouts import HEAD_KEYS as _HEAD_KEYS
from .layouts import internal_key
from .quantized import folder_spec, load_quantized

__all__ = ["CheckpointError", "check_state_dict", "internal_key", "load_hf_checkpoint", "load_state_dict_into",
           "read_safetensors", "safetensors_files"]

# SigLIP's pooling head (MAP), palikit names; PaliGemma uses the per-patch features, never this head
_SIGLIP_POOL_HEAD = {f"vision_tower.head.{k}" for k in (
    "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
    "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias")}
log = logging.getLogger("palikit.weights")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the key, the expected and found shapes."""


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder or a single `.safetensors` / index file."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _files_from_index(path)
        return [path]
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _files_from_index(index)
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"No safetensors weights in {path} (expected model.safetensors or model.safetensors.index.json)."
    )


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e}).") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are not there: {', '.join(missing)}")
    return files


def read_safetensors(path: str | Path, device: str | torch.device = "cpu", dtype=None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint with palikit names (layout detected per key)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    head = None
    unused: list[str] = []
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                if key in _HEAD_KEYS:
                    head = (key, t)
                    continue
                name = internal_key(key)
                if name in _SIGLIP_POOL_HEAD:
                    unused.append(key)
                    continue
                if name in out:
                    raise CheckpointError(f"{file}: tensor {key!r} maps to {name!r}, which another key already gave.")
                out[name] = t
    if head is not None:
        emb = out.get("language_model.embed_tokens.weight")
        key, t = head
        if emb is not None and (t.shape != emb.shape or not torch.equal(t, emb)):
            raise CheckpointError(
                f"{key} differs from the embedding: palikit supports the tied head every PaliGemma uses "
                "(tie_word_embeddings=True)."
            )
    if unused:
        log.warning("%s: ignoring %d tensors of SigLIP's pooling head, which PaliGemma does not use: %s",
                 path, len(unused), ", ".join(sorted(unused)))
    return out


def check_state_dict(model: PaliGemmaModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError listing missing, unexpected and mis-shaped tensors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, expected[k], tuple(sd[k].shape)) for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not match the {model.config.name} architecture:"]
    lines += [f"  missing tensor {k} (expected shape {expected[k]})" for k in missing[:20]]
    lines += [f"  unexpected tensor {k} {tuple(sd[k].shape)}" for k in unexpected[:20]]
    lines += [f"  {k}: expected shape {e}, found {f}" for k, e, f in wrong[:20]]
    more = len(missing) + len(unexpected) + len(wrong) - min(len(missing), 20) - min(len(unexpected), 20) - min(len(wrong), 20)
    if more > 0:
        lines.append(f"  ... and {more} more")
    lines.append("Check that config.json belongs to these weights (model size and image resolution).")
    raise CheckpointError("\n".join(lines))


def load_state_dict_into(model: PaliGemmaModel, sd: dict[str, torch.Tensor], source: str) -> PaliGemmaModel:
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_hf_checkpoint(
    path: str | Path,
    config: PaliGemmaConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    final_logit_softcap: Any = "auto",
    sliding_window: Any = "auto",
) -> PaliGemmaModel:
    """Load a Hub-layout folder (config.json + safetensors) into a PaliGemmaModel. The final soft-cap
    and sliding window follow the checkpoint ("auto", see `weights/conventions.py`) unless overridden
    (a number, or None for off); an explicit `config` is used as given."""
    path = Path(path)
    if config is None:
        from .conventions import config_from_json_file

        config = config_from_json_file(path if path.is_dir() else path.parent,
                                       final_logit_softcap=final_logit_softcap, sliding_window=sliding_window)
    spec = folder_spec(path)
    sd = read_safetensors(path, device=device, dtype=dtype)
    if spec is not None:  # a `palikit quantize` folder: int8 / int4 modules
        return load_quantized(sd, config, spec, path, dtype=dtype)
    model = build_model(config, device="meta")
    return load_state_dict_into(model, sd, str(path)).eval()
