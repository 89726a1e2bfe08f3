"""Export a palikit model to the published Hugging Face Hub layout (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.linear.*`, tied head omitted) with a
config.json that transformers reads, so a checkpoint made here loads in transformers and vLLM, and
a model card (README.md) that states the final soft-cap and sliding window in force (config.json's
`palikit` block records them, so a reload keeps them: `weights/conventions.py`).
Every file is written atomically (temporary name, then rename): a crash never leaves half a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import atomic_write_bytes, atomic_write_json
from ..model import PaliGemmaModel
from .layouts import to_layout

__all__ = ["hub_key", "hub_state_dict", "save_hub_checkpoint"]


def hub_key(name: str) -> str:
    """palikit's parameter name -> its key in the published Hub layout (`weights/layouts.py`)."""
    return to_layout(name, "hub")


def hub_state_dict(model: PaliGemmaModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[hub_key(name)] = t.contiguous().cpu()
    return out


def save_hub_checkpoint(
    model: PaliGemmaModel,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + model.safetensors (or shards + index when larger than max_shard_bytes)."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = hub_state_dict(model, dtype)
    meta = {"format": "pt"}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        atomic_write_bytes(folder / "model.safetensors", st_save(shards[0], metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write_bytes(folder / name, st_save(shard, metadata=meta))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = model.config.to_hf_dict()
    used = dtype or next(iter(sd.values())).dtype
    cfg["torch_dtype"] = str(used).removeprefix("torch.")
    atomic_write_json(folder / "config.json", cfg)
    atomic_write_bytes(folder / "README.md", model_card(model.config))
    return folder


def model_card(config) -> str:
    """A short Hub model card: architecture and the logit conventions this checkpoint carries."""
    t = config.text
    cap = f"{t.final_logit_softcapping:g}" if t.final_logit_softcapping else "off"
    window = str(t.sliding_window) if t.sliding_window else "off (full attention)"
    why = "".join(f"- {line}\n" for line in config.conventions) or "- as configured when the model was built\n"
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags: [paligemma, palikit]\n---\n\n"
        f"# {config.name}\n\n{config.family} ({config.vision.image_size}px, {config.vision.num_image_tokens} image "
        f"tokens), exported by palikit in the Hugging Face Hub layout.\n\n"
        f"## Conventions in force\n\n| | value |\n|---|---|\n"
        f"| final logit soft-cap | {cap} |\n| attention logit soft-cap | {t.attn_logit_softcapping or 'off'} |\n"
        f"| sliding window | {window} |\n\n{why}\n"
        "config.json's `text_config` carries the same values, so transformers applies them too; its `palikit` "
        "block tells palikit to keep them on reload.\n"
    )
