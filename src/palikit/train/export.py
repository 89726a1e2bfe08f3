"""The end of a fine-tuning run: `output_dir/final` in the Hub layout (LoRA merged; the adapter
saved beside it in PEFT format), with the tokenizer, preprocessor and mask-codec files copied so the
folder is a complete palikit / transformers checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..fileio import atomic_dir
from ..tokenizer import TOKENIZER_FILES
from .loading import load_model
from .modes import apply_mode, has_lora, merge_lora


def export_final(tr) -> Path:
    """`output_dir/final`: the final weights in the Hub layout (LoRA merged, the adapter first saved to
    `output_dir/adapter` in PEFT format) with the tokenizer / preprocessor / codec files, written
    atomically. Under FSDP the full weights are gathered (a collective) and rank 0 writes."""
    final = tr.out / "final"
    from ..weights.export import save_hub_checkpoint

    model = tr.model
    if tr.fsdp:  # gather the full weights (collective), then export an unsharded copy on rank 0
        from .fsdp import full_model_state

        full = full_model_state(tr.model)
        if not tr.is_main:
            return final
        cfg = tr.cfg
        model = load_model(cfg.model, final_logit_softcap=cfg.final_logit_softcap)
        apply_mode(model, cfg.mode, freeze_vision=cfg.freeze_vision, freeze_decoder=cfg.freeze_decoder,
                   lora_targets=cfg.lora_targets, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                   lora_dropout=cfg.lora_dropout)
        model.load_state_dict(full, strict=True)
    if not tr.is_main:
        return final
    if has_lora(model):
        cfg = tr.cfg
        from ..weights.adapter import save_lora_adapter

        path = save_lora_adapter(model, tr.out / "adapter", {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                                                               "dropout": cfg.lora_dropout}, base_model=cfg.model)
        tr.log(f"saved the LoRA adapter in PEFT format to {path} (palikit --adapter, "
               "PaliGemma.from_pretrained(adapter=...), peft.PeftModel.from_pretrained)")
        merge_lora(model)
    dtype = None
    if tr.cfg.export_dtype:
        from ..runtime import resolve_dtype

        dtype = resolve_dtype(tr.cfg.export_dtype, tr.device)

    def fill(tmp: Path):
        save_hub_checkpoint(model, tmp, dtype=dtype)
        copy_side_files(tr, tmp)

    atomic_dir(final, fill)
    tr.log(f"exported {final}")
    return final


def copy_side_files(tr, dst: Path) -> None:
    """Tokenizer and preprocessor files next to the exported weights, so `final/` is a complete
    palikit / transformers checkpoint."""
    cfg = tr.cfg
    model_dir = Path(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None
    tok = getattr(tr.collator.tokenizer, "path", None) or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    files = []
    if tok is not None and Path(tok).is_file():
        files.append(Path(tok))
    for d in filter(None, (model_dir, Path(tok).parent if tok else None)):
        files += [d / n for n in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json",
                                  "preprocessor_config.json", "vae-oid.npz")]
    for f in files:
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    if cfg.mask_codec and Path(cfg.mask_codec).is_file() and not (dst / "vae-oid.npz").exists():
        shutil.copy(cfg.mask_codec, dst / "vae-oid.npz")  # so the exported model can decode <seg> tokens
    fix_image_seq_length(tr, dst / "preprocessor_config.json")


def fix_image_seq_length(tr, path: Path) -> None:
    """transformers' PaliGemmaProcessor inserts `image_seq_length` <image> tokens: a copied file that
    disagrees with the model (a stale base folder) would make transformers feed the wrong count."""
    if not path.is_file():
        return
    d = json.loads(path.read_text())
    n = tr.model.config.vision.num_image_tokens
    if d.get("image_seq_length") not in (None, n):
        tr.log(f"{path.name}: image_seq_length {d['image_seq_length']} -> {n} (the model's image tokens)")
        d["image_seq_length"] = n
        path.write_text(json.dumps(d, indent=2) + "\n")
